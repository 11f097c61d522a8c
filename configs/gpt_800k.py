# gpt_800k: a GPT of 4 layers, width 128, on shakespeare_char: nanoGPT's CPU recipe's model.
# Everything not set here is train.py's default (so this is plain `python train.py`): 4 layers,
# 4 heads, 64 characters of context, batch 12, 2000 steps at learning rate 1e-3 (Muon, WSD):
# minutes on a CPU. The small GPT and LLaMA configs differ only in arch and width, for the size
# sweep in README.
n_embd = 128
out_dir = 'out-gpt_800k'
