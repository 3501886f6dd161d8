//! TLS on the gRPC endpoint, with certificates generated for the test: workers that trust
//! the cluster's CA train the same network as over plain gRPC; a plain-text worker and a
//! worker trusting another CA never get in, and say why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ccq_tests::{spawn_cluster, tiny_config, write_tiny_mnist};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a server certificate it signed for localhost / 127.0.0.1, as PEM files.
fn write_pki(dir: &Path, name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-server.pem")),
        key: dir.join(format!("{name}-server.key")),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert, server.pem()).unwrap();
    std::fs::write(&pki.key, server_key.serialize_pem()).unwrap();
    pki
}

fn worker(
    url: String,
    tls_ca: Option<PathBuf>,
    give_up: Option<Duration>,
) -> ccq_worker::WorkerConfig {
    ccq_worker::WorkerConfig {
        give_up_after: give_up,
        tls_ca,
        ..ccq_tests::worker_config(url, "tls-test", None)
    }
}

async fn outsider(url: String, tls_ca: Option<PathBuf>) -> String {
    let cfg = worker(url, tls_ca, Some(Duration::from_millis(1500)));
    match ccq_worker::run(cfg, std::future::pending()).await {
        Ok(exit) => panic!("an outsider got in and finished with {exit:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_cluster_trains_the_same_network_and_refuses_outsiders() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 700, 120, 8);
    let pki = write_pki(dir.path(), "cluster");
    let stranger = write_pki(dir.path(), "stranger");

    let plain_out = dir.path().join("plain");
    spawn_cluster(tiny_config(dir.path(), &plain_out, 320), 2)
        .await
        .finish()
        .await;

    // The same run behind TLS. Its workers join only after the outsiders were refused,
    // so the run is certainly live while they knock.
    let out = dir.path().join("tls");
    let mut cfg = tiny_config(dir.path(), &out, 320);
    cfg.cluster.tls_cert = Some(pki.cert.clone());
    cfg.cluster.tls_key = Some(pki.key.clone());
    cfg.cluster.tls_ca = Some(pki.ca.clone());
    cfg.cluster.shards = Some(2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = ccq_coordinator::run::RunOptions {
        config: cfg,
        local_workers: 0,
        worker_threads: 1,
        token: None,
        insecure: false,
        resume: false,
    };
    let (stop, mut stop_rx) = tokio::sync::broadcast::channel::<()>(1);
    let run = tokio::spawn(ccq_coordinator::run::run(opts, listener, async move {
        let _ = stop_rx.recv().await;
    }));

    // While it runs: plain text and a foreign CA are turned away at the handshake.
    let plain = outsider(format!("http://{addr}"), None).await;
    assert!(plain.contains("if the coordinator uses TLS"), "{plain}");
    let foreign = outsider(format!("https://{addr}"), Some(stranger.ca.clone())).await;
    assert!(
        foreign.contains("unreachable") && foreign.to_lowercase().contains("certificate"),
        "the refusal should name the certificate problem: {foreign}"
    );

    let members: Vec<_> = (0..2)
        .map(|_| {
            let cfg = worker(format!("https://{addr}"), Some(pki.ca.clone()), None);
            tokio::spawn(ccq_worker::run(cfg, std::future::pending()))
        })
        .collect();
    let report = run.await.unwrap().expect("the TLS run succeeds");
    for m in members {
        assert_eq!(m.await.unwrap().unwrap(), ccq_worker::Exit::RunDone);
    }
    drop(stop);
    assert_eq!(report.evaluations, 320);
    assert!(
        std::fs::read(out.join("model.ccq")).unwrap()
            == std::fs::read(plain_out.join("model.ccq")).unwrap(),
        "TLS changed the trained network"
    );

    // Local workers of a TLS coordinator connect over https and trust cluster.tls_ca.
    let local_out = dir.path().join("tls-local");
    let mut cfg = tiny_config(dir.path(), &local_out, 320);
    cfg.cluster.tls_cert = Some(pki.cert.clone());
    cfg.cluster.tls_key = Some(pki.key.clone());
    cfg.cluster.tls_ca = Some(pki.ca.clone());
    let opts = ccq_coordinator::run::RunOptions {
        config: cfg,
        local_workers: 2,
        worker_threads: 1,
        token: None,
        insecure: false,
        resume: false,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let report = ccq_coordinator::run::run(opts, listener, std::future::pending())
        .await
        .expect("the run with local TLS workers succeeds");
    assert_eq!(report.evaluations, 320);
    assert!(
        std::fs::read(local_out.join("model.ccq")).unwrap()
            == std::fs::read(plain_out.join("model.ccq")).unwrap(),
        "TLS changed the trained network"
    );
}

#[test]
fn half_a_tls_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path(), "c");
    let mut cfg = tiny_config(dir.path(), &dir.path().join("o"), 100);
    cfg.cluster.tls_cert = Some(pki.cert);
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("cluster.tls_cert/tls_key"), "{e}");
    let e = ccq_proto::client::endpoint("https://127.0.0.1:1", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--tls-ca"), "{e}");
    let e =
        ccq_proto::client::endpoint("https://127.0.0.1:1", Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
    assert!(e.contains("missing.pem"), "{e}");
}
