//! TLS from configuration: a server certificate, and mutual TLS with a client CA. The
//! certificates are made with the `openssl` command in a temp folder during the test.

mod api_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use api_support::*;
use setpoint::api::proto::GetInstanceRequest;
use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::{ApiConfig, TlsFiles};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by
/// the CA.
fn make_certs() -> PathBuf {
    let d = std::env::temp_dir().join(format!("setpoint-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    openssl(
        &d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=setpoint test CA",
        ],
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    // An extension makes the certificate X.509 v3 (rustls refuses v1 certificates).
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in [
        ("server", Some("server.ext")),
        ("client", Some("client.ext")),
    ] {
        openssl(
            &d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
        ];
        if let Some(ext) = ext {
            args.extend(["-extfile", ext]);
        }
        openssl(&d, &args);
    }
    d
}

async fn tls_client(
    env: &Env,
    certs: &Path,
    with_client_cert: bool,
) -> Result<InstanceServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(certs.join("ca.pem")).unwrap(),
        ))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(certs.join("client.pem")).unwrap(),
            std::fs::read(certs.join("client.key")).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://{}", env.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(InstanceServiceClient::new(channel))
}

#[tokio::test]
async fn server_tls_and_mutual_tls_from_configuration() {
    let certs = make_certs();
    let get = || GetInstanceRequest {
        name: "tenants/acme/instances/none".into(),
    };

    // Server certificate only.
    let env = Env::start(ApiConfig {
        tls: Some(TlsFiles {
            cert: certs.join("server.pem"),
            key: certs.join("server.key"),
            client_ca: None,
        }),
        ..ApiConfig::default()
    })
    .await;
    let mut c = tls_client(&env, &certs, false).await.expect("TLS connects");
    let e = c.get_instance(authed(&env.acme, get())).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "an authenticated call over TLS: {e:?}"
    );
    // Plaintext is not served.
    let plain = match Channel::from_shared(env.url()).unwrap().connect().await {
        Err(_) => true,
        Ok(ch) => InstanceServiceClient::new(ch)
            .get_instance(authed(&env.acme, get()))
            .await
            .is_err_and(|e| e.code() != Code::NotFound),
    };
    assert!(plain, "plaintext must not be served");
    drop(c);
    env.stop().await;

    // Mutual TLS: a client without a certificate signed by the client CA is refused.
    let env = Env::start(ApiConfig {
        tls: Some(TlsFiles {
            cert: certs.join("server.pem"),
            key: certs.join("server.key"),
            client_ca: Some(certs.join("ca.pem")),
        }),
        ..ApiConfig::default()
    })
    .await;
    let mut c = tls_client(&env, &certs, true).await.expect("mTLS connects");
    let e = c.get_instance(authed(&env.acme, get())).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let refused = match tls_client(&env, &certs, false).await {
        Err(_) => true,
        Ok(mut c) => c
            .get_instance(authed(&env.acme, get()))
            .await
            .is_err_and(|e| e.code() != Code::NotFound),
    };
    assert!(refused, "a client without a certificate must be refused");
    drop(c);
    env.stop().await;
    let _ = std::fs::remove_dir_all(&certs);
}
