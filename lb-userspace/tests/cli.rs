//! The `apilb` binary's exit codes and messages, run as a user would run it.

use std::process::Command;

fn apilb_check(config: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!(
        "apilb-cli-test-{}-{}",
        std::process::id(),
        config.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("apilb.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apilb"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

const VALID: &str = r#"
[datapath]
interfaces = ["lo"]
snat_ipv4 = "127.0.0.1"
[[vip]]
address = "127.0.0.100"
[[backend]]
address = "127.0.0.2:6443"
[health]
kind = "tcp"
"#;

#[test]
fn check_accepts_a_valid_file_with_exit_0() {
    let (ok, text) = apilb_check(VALID);
    assert!(ok, "{text}");
    assert!(
        text.contains("valid: 1 VIP(s), 1 backend(s), interfaces lo"),
        "{text}"
    );
}

#[test]
fn check_prints_the_nat_capacity_and_warns_when_it_falls_short() {
    let one_master = VALID.replace("[datapath]", "[datapath]\nnat_ports = [1024, 32767]");
    let (ok, text) = apilb_check(&one_master);
    assert!(ok, "a warning is no refusal: {text}");
    for line in [
        "NAT capacity, IPv4: 1 SNAT address(es) x 31744 ports (1024-32767) = 31744 NAT ports \
         per master, 1 master(s) taking new flows",
        "per master: at most 31744 flows open at once",
        "per master, held up: 15872 new connections/s when ports come back after \
         tcp_timeouts.close (2s)",
        "per master, held up: 488 new connections/s when ports come back after \
         tcp_timeouts.time_wait (65s)",
        "SYN flood: holds at most 31744 NAT ports of a master (half_open_table_size 32768)",
        "node, held up: 15872 new connections/s with TCP timestamps, 488 without \
         (datapath.expected_connection_rate 1000)",
        "warning: datapath.expected_connection_rate = 1000: the node takes 488 new \
         connections/s held up",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    let (ok, text) = apilb_check(&one_master.replace(
        "snat_ipv4 = \"127.0.0.1\"",
        "snat_ipv4 = [\"127.0.0.1\", \"127.0.0.3\", \"127.0.0.4\"]\nexpected_connection_rate = 1400",
    ));
    assert!(ok, "{text}");
    assert!(
        text.contains("3 SNAT address(es) x 31744 ports (1024-32767) = 95232 NAT ports")
            && !text.contains("warning: datapath.expected_connection_rate"),
        "three addresses carry 1465 a second: {text}"
    );
}

#[test]
fn check_warns_of_timeouts_that_cost_something_and_refuses_those_below_a_floor() {
    let (ok, text) = apilb_check(&format!(
        "{VALID}[datapath.tcp_timeouts]\ntime_wait = \"30s\"\nsyn_sent = \"1s\"\n"
    ));
    assert!(ok, "a warning is no refusal: {text}");
    for line in [
        "warning: datapath.tcp_timeouts.time_wait = 30s: shorter than a Linux master's \
         TIME_WAIT (1m, fixed)",
        "warning: datapath.tcp_timeouts.syn_sent = 1s with health.passive = true",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    let (ok, text) = apilb_check(&format!(
        "{VALID}[datapath.tcp_timeouts]\nestablished = \"30s\"\n"
    ));
    assert!(!ok, "{text}");
    assert!(
        text.contains("datapath.tcp_timeouts.established = 30s: must be at least 1m: "),
        "{text}"
    );
}

#[test]
fn check_refuses_a_bad_file_with_a_non_zero_exit_naming_key_and_value() {
    let (ok, text) = apilb_check(&VALID.replace("\"127.0.0.2:6443\"", "\"127.0.0.2:0\""));
    assert!(!ok, "{text}");
    assert!(
        text.contains("backend[0].address = \"127.0.0.2:0\": a port must be 1-65535"),
        "{text}"
    );
    let (ok, text) = apilb_check("this is = not toml [");
    assert!(!ok && text.contains("is refused"), "{text}");
}

#[test]
fn version_flag_and_verb_both_print_apilb_and_the_version() {
    let expected = format!("apilb {}\n", env!("CARGO_PKG_VERSION"));
    for arg in ["--version", "version"] {
        let out = Command::new(env!("CARGO_BIN_EXE_apilb"))
            .arg(arg)
            .output()
            .unwrap();
        assert!(out.status.success(), "apilb {arg}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            expected,
            "apilb {arg}"
        );
    }
}
