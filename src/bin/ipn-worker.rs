//! `ipn-worker`: verifies and republishes IPNs. Not built yet: see the worker issue.
use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "ipn-worker: not yet implemented; IPNs accepted by ipn-ingress wait safely in the \
         <prefix>.inbound.<n> queues until it is"
    );
    // EX_UNAVAILABLE: a supervisor should not mistake this for a clean run.
    ExitCode::from(69)
}
