# gpt2_350m: GPT-2 medium (24 layers, 16 heads, 1024 wide, 1024 tokens) on OpenWebText.
# gpt2_124m.py's recipe with this shape and GPT-3's learning rate for the size.
include("gpt2_124m.py")
batch_size = 12
n_layer = 24
n_head = 16
n_embd = 1024
learning_rate = 3e-4
min_lr = 3e-5
out_dir = 'out-gpt2_350m'
wandb_run_name = 'gpt2-350m'
