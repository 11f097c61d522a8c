# llama_70m: the BitNet-LLama-70M project's model: a 12-layer LLaMA, 512 wide, on Cosmopedia.
# Tied embeddings and widths that are multiples of 256, so it exports to GGUF. 16 x 1024 tokens x
# 32 accumulation steps = 524,288 tokens a step. Prepare the data first:
#   python -m data.cosmopedia.prepare
# then: python train.py configs/llama_70m.py (one GPU; wandb_log=True to log as that project did).
# The learning rate follows the b1.58 training tips for small models: high, in two stages.
arch = 'llama'
dataset = 'cosmopedia'
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32
n_layer = 12
n_head = 8
n_embd = 512
ffn_hidden = 1792
tie_embeddings = True
learning_rate = 1.5e-3
min_lr = 0.0
bit_lr_scale = 1.0
lr_schedule = 'two_stage'
wd_schedule = 'two_stage'
max_iters = 10000
lr_decay_iters = 10000
warmup_iters = 375
weight_decay = 0.1
beta2 = 0.95
optimizer = 'adamw'  # the b1.58 paper's optimizer, with its two-stage schedule
eval_interval = 500
eval_iters = 100
out_dir = 'out-llama_70m'
wandb_project = 'bitnet-llama'
wandb_run_name = 'llama-70m'
