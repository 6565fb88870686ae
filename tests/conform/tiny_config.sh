# Sourced by the conform tests that train: write_tiny_run DIR PLUGIN writes
# DIR/tiny.txt (a small corpus) and DIR/tiny.toml, a model that trains in a
# second: d_model 16, 1 layer, seq_len 16, batch 4, E 4 (top 2), 5 steps.
write_tiny_run() {
    local dir=$1 plugin=$2 i
    for i in $(seq 1 40); do
        echo "the cat sat on the mat $i times and the dog ran to the red ball while birds sang."
    done >"$dir/tiny.txt"
    cat >"$dir/tiny.toml" <<TOML
[run]
name = "tiny"
out_dir = "$dir/runs"
seed = 1
device = "cpu"

[data]
path = "$dir/tiny.txt"
tokenizer = "char"
val_fraction = 0.1

[model]
d_model = 16
n_layers = 1
n_heads = 2
seq_len = 16

[moe]
num_experts = 4
top_k = 2
d_ff = 32

[router]
plugin = "$plugin"

[train]
steps = 5
batch_size = 4
warmup_steps = 1
log_interval = 1

[eval]
interval = 5
max_tokens = 256
TOML
}
