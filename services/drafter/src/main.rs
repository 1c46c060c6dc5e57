//! `mulo-drafter`: the drafter role of mulo behind gRPC (`mulo.v1.Drafter`, DESIGN §5), with
//! the Info handshake, gRPC health, reflection and a graceful drain on SIGTERM.

fn main() -> std::process::ExitCode {
    mulo_server::main_role("drafter")
}
