//! Test fixtures: a moto server per test binary, fake EC2 endpoints, and client helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::Credentials;
use setpoint_adapter::{IdempotencyToken, InstanceRequest};
use setpoint_ec2::{Ec2Compute, Ec2Config, TAG_TOKEN};

/// An AMI id moto accepts when it does not validate AMIs.
pub const ANY_AMI: &str = "ami-12c6146b";

/// A moto server process, killed on drop. The Python side also exits when the test binary
/// does (it watches its parent), so a `static` fixture never outlives the tests.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts moto on a free port with extra environment variables, waiting until it listens.
    pub fn start(env: &[(&str, &str)]) -> Moto {
        Self::start_on(free_port(), env)
    }

    /// Starts moto on `port`.
    pub fn start_on(port: u16, env: &[(&str, &str)]) -> Moto {
        let script = format!(
            "import os, sys, threading, time\n\
             parent = os.getppid()\n\
             def watch():\n\
             \x20   while os.getppid() == parent:\n\
             \x20       time.sleep(0.5)\n\
             \x20   os._exit(0)\n\
             threading.Thread(target=watch, daemon=True).start()\n\
             from moto.server import main\n\
             main(['-H', '127.0.0.1', '-p', '{port}'])\n"
        );
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .expect("python3 with moto[server] must be installed");
        let moto = Moto { child, port };
        let give_up = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < give_up,
                "moto did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A configuration for tests: fast polling, one SDK attempt, short timeouts.
pub fn config(endpoint: &str) -> Ec2Config {
    config_in("us-east-1", endpoint)
}

/// [`config`] for another region (one moto server answers every region, each with its own
/// state: the region comes from the request's signature).
pub fn config_in(region: &str, endpoint: &str) -> Ec2Config {
    let mut c = Ec2Config::new(region);
    c.endpoint_url = Some(endpoint.to_owned());
    c.default_image_id = Some(ANY_AMI.to_owned());
    c.max_attempts = 1;
    c.timeouts.connect_ms = 2_000;
    c.timeouts.attempt_ms = 15_000;
    c.timeouts.operation_ms = 20_000;
    c.timeouts.poll_initial_ms = 50;
    c.timeouts.poll_max_ms = 200;
    c
}

pub async fn compute(config: Ec2Config) -> Ec2Compute {
    let client = config
        .client_with_credentials(Credentials::new("testing", "testing", None, None, "tests"))
        .await
        .unwrap();
    Ec2Compute::from_client(client, config)
}

pub fn request(tenant: &str) -> InstanceRequest {
    InstanceRequest {
        resource_id: uuid::Uuid::new_v4(),
        tenant: tenant.to_owned(),
        plan: "kvx.small".to_owned(),
        name: None,
        image_id: None,
        instance_type: None,
        subnet_id: None,
        data_volume_gb: None,
    }
}

pub fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// Every instance (any state) tagged with `token`: (id, state name).
pub async fn tagged(client: &Client, token: &IdempotencyToken) -> Vec<(String, String)> {
    let out = client
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{TAG_TOKEN}"))
                .values(token.as_str())
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap().to_owned(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// A fake EC2 endpoint: answers every request with `status` and `body`, or (with `status` 0)
/// accepts connections and never answers. Runs until the process exits.
pub fn fake_endpoint(status: u16, body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            if status == 0 {
                held.push(stream);
                continue;
            }
            thread::spawn(move || {
                let _ = read_request(&mut stream);
                let response = format!(
                    "HTTP/1.1 {status} Error\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
                let _ = stream.flush();
            });
        }
    });
    url
}

fn read_request(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(());
        }
    }
}

/// A proxy in front of the EC2 endpoint at `target` (`host:port`) that sends every request
/// whose body contains `action` (e.g. `Action=RunInstances`) to the endpoint twice and answers
/// with the second answer; every other request once. With `RunInstances` and moto (which does
/// not honour `ClientToken`) it makes exactly the race of two attempts of one unit: another
/// launch with the same token lands just before the caller's own, after the caller looked by
/// tag and found nothing. Runs until the process exits; each connection serves one request.
pub fn duplicating_proxy(target: &str, action: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let target = target.to_owned();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut client) = stream else { continue };
            let target = target.clone();
            thread::spawn(move || {
                let Ok(Some((head, body))) = read_whole_request(&mut client) else {
                    return;
                };
                let times = if body.windows(action.len()).any(|w| w == action.as_bytes()) {
                    2
                } else {
                    1
                };
                let mut answer = Vec::new();
                for _ in 0..times {
                    answer = match forward(&target, &head, &body) {
                        Ok(a) => a,
                        Err(_) => return,
                    };
                }
                let _ = client.write_all(&answer);
                let _ = client.flush();
            });
        }
    });
    url
}

/// One request from `stream`: its head (request line and headers, without the blank line) and
/// its body (by `Content-Length`); `None` when the peer closed first.
fn read_whole_request(stream: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Ok(None);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(Some((head, buf[end + 4..end + 4 + len].to_vec())));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends one request to `target` on a connection of its own (`Connection: close`) and
/// returns the whole answer.
fn forward(target: &str, head: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut upstream = TcpStream::connect(target)?;
    let mut request = String::new();
    for line in head.lines() {
        if line
            .split_once(':')
            .is_some_and(|(k, _)| k.eq_ignore_ascii_case("connection"))
        {
            continue;
        }
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    upstream.write_all(request.as_bytes())?;
    upstream.write_all(body)?;
    upstream.flush()?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    Ok(answer)
}
