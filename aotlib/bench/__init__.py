"""Benchmarks (not tests): timings that print ratios against targets and write CSVs.

python -m aotlib.bench ssd     # SSD paths vs the paper's listing, the scan, attention
python -m aotlib.bench gpu     # CUDA: Triton SSD vs FlashAttention and PyTorch, 130m check
python -m aotlib.bench train   # training throughput as a share of the matmul rate
python -m aotlib.bench against REV   # the SSD's training path vs itself at a git revision
"""
