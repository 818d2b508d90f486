//! The dev stack as the end-to-end tests drive it: `setpoint dev` (or `serve`) as a child
//! process, a gRPC client of its API, and what moto holds, read with boto3 in a small Python
//! script per question (boto3 ships with moto).

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::proto::{
    CreateInstanceRequest, GetInstanceRequest, Instance, InstanceSpec, InstanceStatus,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::peers::{Bearer, Proc};

/// A client of the instance API with a bearer token.
pub type Api = InstanceServiceClient<InterceptedService<Channel, Bearer>>;

/// Creates `kvx.small` instance `name` (10 GiB) of tenant `demo` in `region`; panics when the
/// API refuses it.
pub async fn create_small(api: &Api, name: &str, region: &str) {
    api.clone()
        .create_instance(CreateInstanceRequest {
            parent: "tenants/demo".into(),
            instance_id: name.into(),
            instance: Some(Instance {
                spec: Some(InstanceSpec {
                    plan: "kvx.small".into(),
                    region: region.into(),
                    size_gb: 10,
                    owner_email: "owner@example.com".into(),
                }),
                ..Instance::default()
            }),
            request_id: format!("create-{name}"),
            bulk: false,
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
}

/// `setpoint dev --dir DIR/stack` with `extra` flags and environment `env`, logging (appended)
/// into `DIR/dev.log`; returns the process (its group is killed on drop) and its info file.
pub async fn start_dev(dir: &Path, extra: &[String], env: &[(&str, &str)]) -> (Proc, Value) {
    start_dev_with(env!("CARGO_BIN_EXE_setpoint").as_ref(), dir, extra, env).await
}

/// As [`start_dev`], with the `setpoint` binary at `binary` (another release's).
pub async fn start_dev_with(
    binary: &Path,
    dir: &Path,
    extra: &[String],
    env: &[(&str, &str)],
) -> (Proc, Value) {
    use std::os::unix::process::CommandExt;
    let info = dir.join("info.json");
    let _ = std::fs::remove_file(&info);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dev.log"))
        .expect("log");
    let child = Command::new(binary)
        .arg("dev")
        .arg("--dir")
        .arg(dir.join("stack"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--info-file")
        .arg(&info)
        .args(extra)
        // The web console is on by default in dev, at 127.0.0.1:8080: a port of its own, so
        // that stacks side by side do not collide (a flag in `extra` wins; a release before
        // the console ignores the variable).
        .env("SETPOINT_CONSOLE_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info,sqlx=warn")
        .env_remove("SETPOINT_FAILPOINTS")
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("setpoint dev");
    let mut proc = Proc(child);
    let value = super::wait_for("setpoint dev to start", || {
        let info = info.clone();
        let exited = proc.0.try_wait().ok().flatten();
        async move {
            assert!(exited.is_none(), "setpoint dev exited at start: {exited:?}");
            let text = std::fs::read_to_string(&info).ok()?;
            serde_json::from_str::<Value>(&text).ok()
        }
    })
    .await;
    (proc, value)
}

/// A client of the API of `setpoint dev` with its token `which` (`tenant_token` or
/// `admin_token`).
pub async fn client_as(info: &Value, which: &str) -> Api {
    let server = info["server"].as_str().expect("server").to_owned();
    let token = info[which].as_str().expect("token");
    client_for(&server, token).await
}

/// A client of the API at `server` (`http://host:port`) with bearer `token`.
pub async fn client_for(server: &str, token: &str) -> Api {
    let channel = Channel::from_shared(server.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let header = format!("Bearer {token}").parse().expect("header");
    InstanceServiceClient::with_interceptor(channel, Bearer(header))
}

/// The full name of instance `name` of tenant `demo`.
pub fn full(name: &str) -> String {
    format!("tenants/demo/instances/{name}")
}

/// Instance `name` of tenant `demo`, if the API answers with it.
pub async fn get(api: &Api, name: &str) -> Option<Instance> {
    api.clone()
        .get_instance(GetInstanceRequest { name: full(name) })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Waits until instance `name` has status `want` and a generation of at least `generation`;
/// returns it.
pub async fn wait_status(api: &Api, name: &str, want: InstanceStatus, generation: i64) -> Instance {
    let mut last = None;
    let start = std::time::Instant::now();
    loop {
        if let Some(i) = get(api, name).await {
            if i.status == want as i32 && i.generation >= generation {
                return i;
            }
            last = Some(i);
        }
        assert!(
            start.elapsed() < super::HUNG,
            "{name} is not {want:?} at generation {generation}: {last:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// An instance's observed state as JSON.
pub fn observed(instance: &Instance) -> Value {
    instance
        .observed
        .as_ref()
        .map(setpoint::api::convert::struct_to_json)
        .unwrap_or(Value::Null)
}

/// An EC2 instance as moto holds it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Ec2Instance {
    /// `i-…`.
    pub id: String,
    /// `running`, `terminated`, …
    pub state: String,
    /// The instance type.
    pub instance_type: String,
    /// Its tags.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Its block devices: (device name, volume id).
    pub devices: Vec<(String, String)>,
}

impl Ec2Instance {
    /// The setpoint resource it belongs to (tag `setpoint:instance-id`).
    pub fn resource(&self) -> Option<&str> {
        self.tags.get("setpoint:instance-id").map(String::as_str)
    }

    /// True unless terminated (or on the way).
    pub fn live(&self) -> bool {
        !matches!(self.state.as_str(), "terminated" | "shutting-down")
    }
}

/// An EBS volume as moto holds it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Ec2Volume {
    /// `vol-…`.
    pub id: String,
    /// GiB.
    pub size: i64,
    /// `available`, `in-use`, …
    pub state: String,
    /// (instance id, device name) of each attachment.
    pub attachments: Vec<(String, String)>,
}

/// What moto holds in one region.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Ec2Region {
    /// Every instance, terminated ones included.
    pub instances: Vec<Ec2Instance>,
    /// Every volume.
    pub volumes: Vec<Ec2Volume>,
    /// Every volume modification: (volume id, target size).
    pub modifications: Vec<(String, i64)>,
}

impl Ec2Region {
    /// The instances of setpoint resource `uid`.
    pub fn of(&self, uid: &str) -> Vec<&Ec2Instance> {
        self.instances
            .iter()
            .filter(|i| i.resource() == Some(uid))
            .collect()
    }

    /// The volume `id`.
    pub fn volume(&self, id: &str) -> Option<&Ec2Volume> {
        self.volumes.iter().find(|v| v.id == id)
    }
}

/// DescribeInstances, DescribeVolumes and DescribeVolumesModifications of moto at `endpoint`
/// in `region`.
pub fn ec2_region(endpoint: &str, region: &str) -> Ec2Region {
    let script = r#"
import boto3, json, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name=sys.argv[2],
                   aws_access_key_id='testing', aws_secret_access_key='testing')
instances = []
for page in ec2.get_paginator('describe_instances').paginate():
    for r in page['Reservations']:
        for i in r['Instances']:
            instances.append({
                'id': i['InstanceId'],
                'state': i['State']['Name'],
                'instance_type': i['InstanceType'],
                'tags': {t['Key']: t['Value'] for t in i.get('Tags', [])},
                'devices': [[m['DeviceName'], m['Ebs']['VolumeId']]
                            for m in i.get('BlockDeviceMappings', []) if 'Ebs' in m],
            })
volumes = []
for page in ec2.get_paginator('describe_volumes').paginate():
    for v in page['Volumes']:
        volumes.append({
            'id': v['VolumeId'], 'size': v['Size'], 'state': v['State'],
            'attachments': [[a['InstanceId'], a['Device']] for a in v.get('Attachments', [])],
        })
try:
    mods = [[m['VolumeId'], m.get('TargetSize', 0)]
            for m in ec2.describe_volumes_modifications()['VolumesModifications']]
except Exception:
    mods = []
print(json.dumps({'instances': instances, 'volumes': volumes, 'modifications': mods}))
"#;
    let out = Command::new("python3")
        .args(["-c", script, endpoint, region])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "boto3 against moto: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Kills (SIGKILL) the process `proc` alone (not its group) and reaps it.
pub fn kill9(proc: &mut Proc) {
    let _ = Command::new("kill")
        .args(["-KILL", &proc.0.id().to_string()])
        .status();
    let _ = proc.0.wait();
}

/// A fresh directory under the system's temp dir for one test, removed when dropped (also
/// when the test fails; set `SETPOINT_KEEP_TEST_DIRS=1` to keep it for its logs).
pub struct TmpDir(std::path::PathBuf);

impl TmpDir {
    /// A fresh directory for test `name`.
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("setpoint-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("tmp dir");
        Self(d)
    }
}

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if std::env::var_os("SETPOINT_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
