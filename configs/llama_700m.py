# llama_700m: the BitNet b1.58 paper's 700M shape (24 layers, 1536 wide, MLP 4096, 16 heads).
# The paper counts its 700M with a 32k vocabulary; GPT-2's 50304 tokens and an untied head add
# the rest. 8 x 2048 tokens x 64 accumulation steps ~ 1M tokens a step, 100B tokens in all, on
# OpenWebText (the paper used RedPajama); its learning rate, two-stage schedule and weight decay.
arch = 'llama'
dataset = 'openwebtext'
block_size = 2048
batch_size = 8
gradient_accumulation_steps = 64
n_layer = 24
n_head = 16
n_embd = 1536
ffn_hidden = 4096
learning_rate = 1.5e-3
min_lr = 0.0
bit_lr_scale = 1.0
lr_schedule = 'two_stage'
wd_schedule = 'two_stage'
max_iters = 95000
lr_decay_iters = 95000
warmup_iters = 375
weight_decay = 0.1
beta2 = 0.95
optimizer = 'adamw'  # the b1.58 paper's optimizer, with its two-stage schedule
eval_interval = 1000
eval_iters = 100
out_dir = 'out-llama_700m'
wandb_project = 'bitnet-llama'
wandb_run_name = 'llama-700m'
