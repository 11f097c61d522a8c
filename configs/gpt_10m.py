# gpt_10m: nanoGPT's shakespeare_char model: 6 layers, 6 heads, 384 wide, 256 characters of context.
# A GPU trains it in minutes; nanoGPT's float model reaches val loss 1.4697 with this recipe.
include("train_shakespeare_char.py")
out_dir = 'out-gpt_10m'
