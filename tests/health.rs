//! grpc.health.v1 and server reflection, as grpcurl and Kubernetes gRPC probes use
//! them; health turns NOT_SERVING when a graceful shutdown begins.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn status(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> Option<i32> {
    health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

#[tokio::test]
async fn health_and_reflection_answer_and_health_drains_on_shutdown() {
    let (_dir, mut config) = temp_config();
    config.not_serving_grace = Duration::from_millis(1500);
    let mut server = TestServer::start(config).await;
    server.client().await; // wait until it serves
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    assert_eq!(
        status(&mut health, "").await,
        Some(ServingStatus::Serving as i32)
    );
    assert_eq!(
        status(&mut health, "modelbox.ModelStore").await,
        Some(ServingStatus::Serving as i32)
    );
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "modelbox.ModelStore"
        ]
    );

    // Older grpcurl releases use v1alpha.
    {
        use tonic_reflection::pb::v1alpha as alpha;
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut responses = alpha::server_reflection_client::ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            response.message_response
        else {
            panic!("unexpected v1alpha reflection response");
        };
        assert!(list.service.iter().any(|s| s.name == "modelbox.ModelStore"));
    }

    server.begin_stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    let drained = loop {
        let s = status(&mut health, "modelbox.ModelStore").await;
        if s == Some(ServingStatus::NotServing as i32) {
            break true;
        }
        if Instant::now() > deadline || s.is_none() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        drained,
        "health never reported NOT_SERVING before the server went away"
    );
    assert_eq!(
        status(&mut health, "").await,
        Some(ServingStatus::NotServing as i32)
    );
    server.stop().await;
}
