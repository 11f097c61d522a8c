# gpt2_774m: GPT-2 large (36 layers, 20 heads, 1280 wide, 1024 tokens) on OpenWebText.
# gpt2_124m.py's recipe with this shape and GPT-3's learning rate for the size.
include("gpt2_124m.py")
batch_size = 12
n_layer = 36
n_head = 20
n_embd = 1280
learning_rate = 2.5e-4
min_lr = 2.5e-5
out_dir = 'out-gpt2_774m'
wandb_run_name = 'gpt2-774m'
