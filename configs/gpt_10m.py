# gpt_10m: nanoGPT's shakespeare_char model: 6 layers, 6 heads, 384 wide, 256 characters of context.
# parameters: 10.65M | training memory: 1.7 GB (batch_size 64, bfloat16)
# A GPU trains it in minutes; nanoGPT's float model reaches val loss 1.4697 with this recipe.
include("train_shakespeare_char.py")
out_dir = 'out-gpt_10m'
