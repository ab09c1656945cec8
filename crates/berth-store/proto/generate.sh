#!/bin/sh
# Regenerates berth-store's etcd v3 client code (src/etcd_store/proto/*.rs) from the .proto
# files beside this script. Only for a developer who changed those files: building berth needs
# neither this script nor protoc, since the generated code is committed.
#
# Needs the Rust toolchain and protoc (Debian: apt-get install protobuf-compiler). The generator
# is a throwaway cargo project in a temporary directory, pinned to the tonic and prost versions
# berth builds with (see Cargo.lock); it writes etcdserverpb.rs and mvccpb.rs.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out="$here/../src/etcd_store/proto"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/src"
cat >"$work/Cargo.toml" <<'EOF'
[package]
name = "berth-etcd-proto-gen"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
prost-build = "=0.14.6"
tonic-prost-build = { version = "=0.14.9", default-features = false }

[workspace]
EOF
cat >"$work/src/main.rs" <<'EOF'
fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (protos, out) = (args.next().unwrap(), args.next().unwrap());
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(out)
        .compile_with_config(
            // The .proto files are the documentation; etcd's comments are not rustdoc.
            {
                let mut config = prost_build::Config::new();
                config.disable_comments(["."]);
                config
            },
            &[format!("{protos}/rpc.proto"), format!("{protos}/kv.proto")],
            &[protos],
        )
}
EOF
mkdir -p "$out"
cargo run --quiet --manifest-path "$work/Cargo.toml" -- "$here" "$out"
echo "wrote $out/etcdserverpb.rs and $out/mvccpb.rs"
