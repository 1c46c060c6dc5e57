//! `mulo-gateway`: the public API of mulo (`mulo.v1.Gateway`, DESIGN §5): owns each request, runs
//! the cycle over the drafter and verifier replicas, falls back when one fails.

fn main() -> std::process::ExitCode {
    mulo_server::main_gateway()
}
