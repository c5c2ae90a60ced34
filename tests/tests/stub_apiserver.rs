//! The stub apiserver and the generated PKI, checked with a real curl on loopback:
//! certificate verification (IP, VIP and DNS SANs), `/version`, the `x-apiserver`
//! header, `/readyz` switched by a control file, and the 100 ms watch stream.

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tests::pki::Pki;

const NAME: &str = "master-1";
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "apilb-stub-apiserver-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("creating temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running stub apiserver, killed on drop.
struct Stub {
    child: Child,
    addr: SocketAddr,
}

impl Stub {
    fn start(pki: &Pki, control_dir: &Path) -> Self {
        let (cert, key) = pki.cert(NAME);
        let mut child = Command::new(env!("CARGO_BIN_EXE_stub-apiserver"))
            .args(["--listen", "127.0.0.1:0", "--name", NAME, "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--control-dir")
            .arg(control_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting stub-apiserver");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("reading stub stderr");
        // Keep draining stderr so the stub never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("stub: {line}");
            }
        });
        let Some(addr) = line
            .trim()
            .rsplit_once("listening on ")
            .and_then(|(_, addr)| addr.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("unexpected first stub line: {line:?}");
        };
        Self { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("running curl")
}

/// `curl -i` with the CA: the status code, the raw header block and the body.
fn get(ca: &str, url: &str) -> (u16, String, String) {
    let out = curl(&["-i", "--cacert", ca, url]);
    assert!(out.status.success(), "curl {url}: {out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header/body split");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("status line in {head:?}"));
    (status, head.to_owned(), body.to_owned())
}

#[test]
fn stub_apiserver_over_real_curl() {
    let started = Instant::now();
    let tmp = TempDir::new();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let pki = Pki::generate(&tmp.0.join("pki"), &[(NAME.to_owned(), loopback)], &[VIP]);
    let ca = pki.ca_pem.to_str().expect("utf-8 temp path");
    let control = tmp.0.join("control");
    std::fs::create_dir_all(&control).expect("control dir");
    let stub = Stub::start(&pki, &control);

    // /version: kubectl-compatible JSON, and the serving master named in a header.
    let (status, head, body) = get(ca, &stub.url("/version"));
    assert_eq!(status, 200, "{head}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case(&format!("x-apiserver: {NAME}"))),
        "x-apiserver header missing: {head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let version: serde_json::Value = serde_json::from_str(&body).expect("version JSON");
    assert_eq!(version["gitVersion"], "v1.30.0-apilb-stub");
    assert_eq!(version["major"], "1");

    // The certificate verifies for the VIP and the DNS names, not only the master's IP.
    let port = stub.addr.port();
    let via_vip = curl(&[
        "--cacert",
        ca,
        "--connect-to",
        &format!("{VIP}:6443:127.0.0.1:{port}"),
        &format!("https://{VIP}:6443/version"),
    ]);
    assert!(via_vip.status.success(), "VIP SAN: {via_vip:?}");
    let via_dns = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &format!("kubernetes.default:{port}:127.0.0.1"),
        &format!("https://kubernetes.default:{port}/version"),
    ]);
    assert!(via_dns.status.success(), "DNS SAN: {via_dns:?}");

    // Without the CA, verification fails (curl exit 60: peer certificate not trusted).
    let untrusted = curl(&[&stub.url("/version")]);
    assert_eq!(untrusted.status.code(), Some(60), "{untrusted:?}");

    // /readyz follows the control file, checked per request.
    assert_eq!(get(ca, &stub.url("/readyz")).0, 200);
    let fail = control.join("readyz-fail");
    std::fs::write(&fail, "").expect("creating readyz-fail");
    let (status, _, body) = get(ca, &stub.url("/readyz"));
    assert_eq!(status, 500);
    assert!(body.contains("[-]"), "{body}");
    assert_eq!(get(ca, &stub.url("/livez")).0, 200, "only readyz fails");
    std::fs::remove_file(&fail).expect("removing readyz-fail");
    assert_eq!(get(ca, &stub.url("/readyz")).0, 200);

    assert_eq!(get(ca, &stub.url("/nope")).0, 404);
    let (status, _, body) = get(ca, &stub.url("/api/v1/namespaces/default/pods"));
    assert_eq!(status, 200);
    assert!(body.contains("PodList"), "{body}");

    // The watch stream: an event every 100 ms, so at least 5 within 700 ms.
    let watch = Command::new("curl")
        .args(["-sN", "--max-time", "0.7", "--cacert", ca])
        .arg(stub.url("/api/v1/namespaces/default/pods?watch=1"))
        .output()
        .expect("running curl");
    // curl exits 28 (timeout) by design: the stream never ends on its own.
    assert_eq!(watch.status.code(), Some(28), "{watch:?}");
    let events: Vec<serde_json::Value> = String::from_utf8(watch.stdout)
        .expect("utf-8 stream")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert!(
        events.len() >= 5,
        "only {} events: {events:?}",
        events.len()
    );
    assert!(events.iter().all(|e| e["type"] == "MODIFIED"));
    let versions: Vec<u64> = events
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|rv| rv.parse().ok())
                .expect("numeric resourceVersion")
        })
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "resourceVersions not increasing: {versions:?}"
    );

    drop(stub);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
