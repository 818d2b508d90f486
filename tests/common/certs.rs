//! Test certificates, made with the `openssl` command in a temp folder.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn openssl(dir: &Path, args: &[&str]) {
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
pub fn make_certs() -> PathBuf {
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
