//! Starts the real `mulo-gateway` binary on a loopback port: the Info handshake, grpc.health and
//! server reflection answer, and SIGTERM drains and exits cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mulo_proto::v1::capabilities_client::CapabilitiesClient;
use mulo_proto::v1::InfoRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn gateway_answers_info_and_health_then_drains_on_sigterm() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mulo-gateway"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--verifier",
            "127.0.0.1:1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) if start.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => {
                let _ = child.kill();
                panic!("gateway did not come up: {e}");
            }
        }
    };
    let info = CapabilitiesClient::new(channel.clone())
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.role, "gateway");
    assert!(!info.version.is_empty());
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    // Server reflection (what grpcurl uses): the services, and the descriptor of the public API.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let mut answers = refl
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "mulo.v1.Gateway".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let listed = answers.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::ListServicesResponse(l)) = listed else {
        panic!("{listed:?}")
    };
    let names: Vec<&str> = l.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "mulo.v1.Gateway",
        "mulo.v1.Capabilities",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let file = answers.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::FileDescriptorResponse(f)) = file else {
        panic!("{file:?}")
    };
    assert!(!f.file_descriptor_proto.is_empty());

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "exit after SIGTERM: {code:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
