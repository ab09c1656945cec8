//! End-to-end tests: the real daemon and CLI, the real kernel, real traffic. Run as root.

mod bad_input;
mod bridge;
mod cni;
mod crash;
mod dns;
mod docker;
mod harness;
mod nat;
mod plugin_fuzz;
mod podman;
