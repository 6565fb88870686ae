# Sourced by the GPU scripts: write_expc_config FILE RUNS_DIR writes the seed
# experiments' single-run model (expC: E=8, K=2, d=256, 4 layers, 4 heads,
# seq 256, batch 32, CF 1.25, AdamW 3e-4, softk) to FILE, so the scripts do
# not depend on how configs/ lays out its sweeps.
write_expc_config() {
  cat >"$1" <<EOF_CFG
[run]
name = "expC"
out_dir = "$2"
[data]
path = "data/tinystories/tinystories_sample.txt"
[model]
d_model = 256
n_layers = 4
n_heads = 4
seq_len = 256
[moe]
num_experts = 8
top_k = 2
capacity_factor = 1.25
d_ff = 1024
[router]
plugin = "softk"
[train]
steps = 1200
batch_size = 32
lr = 3e-4
warmup_steps = 100
weight_decay = 0.01
grad_clip = 1.0
[eval]
interval = 200
EOF_CFG
}
