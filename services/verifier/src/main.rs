//! `mulo-verifier`: the verifier role of mulo (see DESIGN §5). Today it answers the Info handshake, gRPC
//! health and reflection; the role's API arrives with the services work.

fn main() -> std::process::ExitCode {
    mulo_server::main("verifier")
}
