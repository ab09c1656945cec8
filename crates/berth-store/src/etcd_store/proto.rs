//! etcd's v3 gRPC API: the messages and clients generated from the trimmed .proto files in
//! `crates/berth-store/proto/` (regenerate with `proto/generate.sh`). The code is committed so
//! that building berth needs no protoc.

// Generated: not all of it is used, and it is not written to our lints.
#![allow(dead_code, clippy::all, clippy::pedantic, rust_2018_idioms)]

pub mod mvccpb {
    include!("proto/mvccpb.rs");
}

pub mod etcdserverpb {
    include!("proto/etcdserverpb.rs");
}
