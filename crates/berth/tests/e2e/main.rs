//! End-to-end tests: the real daemon and CLI, the real kernel, real traffic. Run as root.

mod bad_input;
mod bridge;
mod cluster;
mod cni;
mod containerd;
mod crash;
mod dns;
mod docker;
mod etcd_access;
mod firewall;
mod harness;
mod host_collisions;
mod lifecycle;
mod multihost;
mod multihost_crash;
mod multihost_lease;
mod multihost_policy;
mod multihost_runtimes;
mod multihost_services;
mod nat;
mod plugin_fuzz;
mod podman;
mod policy;
mod policy_size;
mod security;
mod services;
