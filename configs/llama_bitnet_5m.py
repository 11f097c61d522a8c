# llama_bitnet_5m: BitNet b1.58 2B4T's layout at 5M: sub-norms, tied head, GQA, on shakespeare_char.
# Widths are multiples of 256 and the head is tied, so it exports both to transformers
# (BitNetForCausalLM) and to llama.cpp ('bitnet', TQ1_0/TQ2_0): README, "transformers and
# llama.cpp".
# mlp='relu2' is 2B4T's exact MLP, but llama.cpp computes SwiGLU, so that one exports to hf only.
arch = 'llama'
n_layer = 6
n_head = 4
n_kv_head = 2
n_embd = 256
ffn_hidden = 768
subln = True
tie_embeddings = True
out_dir = 'out-llama_bitnet_5m'
