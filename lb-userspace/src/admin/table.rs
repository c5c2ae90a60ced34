//! The readable tables `apilb status` prints. The JSON of `/status` is for
//! programs; this is the same snapshot laid out for a person at a terminal, kept
//! apart from the HTTP code because its only contract is the text it prints.

use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::status::vrrp_rejections;
use crate::status::{Snapshot, SyncLinkStatus, SyncPeerStatus, SyncSnapshot};

/// The readable table `apilb status` prints: a header, the VIPs (and the elected
/// ones' elections), the sync peers if sync is on, the backends.
pub fn render_status(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let age = if snapshot.taken_at == 0 {
        "no snapshot yet".to_owned()
    } else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("snapshot {}s old", now.saturating_sub(snapshot.taken_at))
    };
    let _ = writeln!(
        out,
        "apilb {}, instance {:?}, {age}, config reloads: {} applied, {} refused",
        snapshot.version, snapshot.instance, snapshot.reloads_applied, snapshot.reloads_refused,
    );
    if let Some(d) = &snapshot.discovery {
        render_discovery(&mut out, d);
    }
    if snapshot.fail_open {
        out.push_str(
            "WARNING: failing open: no backend is healthy, so every configured backend serves\n",
        );
    }

    out.push('\n');
    let vips: Vec<Vec<String>> = snapshot
        .vips
        .iter()
        .map(|v| {
            vec![
                v.address.to_string(),
                yes_no(v.owned),
                v.election.as_ref().map_or_else(
                    || "static".to_owned(),
                    |e| format!("{} {}", e.mode, e.state),
                ),
                v.packets.to_string(),
                human_bytes(v.bytes),
                v.new_flows.to_string(),
            ]
        })
        .collect();
    write_table(
        &mut out,
        &[
            ("VIP", Align::Left),
            ("OWNED", Align::Left),
            ("ELECTION", Align::Left),
            ("PACKETS", Align::Right),
            ("BYTES", Align::Right),
            ("NEW FLOWS", Align::Right),
        ],
        &vips,
    );

    render_elections(&mut out, snapshot);
    if let Some(sync) = &snapshot.sync {
        render_sync(&mut out, sync);
    }

    render_backends(&mut out, snapshot);
    out
}

/// The backends' table of `apilb status`.
fn render_backends(out: &mut String, snapshot: &Snapshot) {
    out.push('\n');
    let backends: Vec<Vec<String>> = snapshot
        .backends
        .iter()
        .map(|b| {
            vec![
                b.address.to_string(),
                b.id.to_string(),
                b.weight.to_string(),
                if b.membership == "member" {
                    b.source.clone()
                } else {
                    format!("{}, {}", b.source, b.membership)
                },
                b.health.clone(),
                yes_no(b.in_rotation),
                if b.last_probe.is_empty() {
                    "-".to_owned()
                } else {
                    b.last_probe.clone()
                },
                if b.probes == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.1}", b.probe_latency_seconds * 1000.0)
                },
                b.packets.to_string(),
                human_bytes(b.bytes),
                b.new_flows.to_string(),
            ]
        })
        .collect();
    write_table(
        out,
        &[
            ("BACKEND", Align::Left),
            ("ID", Align::Right),
            ("WEIGHT", Align::Right),
            ("SOURCE", Align::Left),
            ("HEALTH", Align::Left),
            ("IN ROTATION", Align::Left),
            ("LAST PROBE", Align::Left),
            ("LATENCY MS", Align::Right),
            ("PACKETS", Align::Right),
            ("BYTES", Align::Right),
            ("NEW FLOWS", Align::Right),
        ],
        &backends,
    );
}

/// The discovery line: state, last slice, lists, updates, refusals, last error.
fn render_discovery(out: &mut String, d: &crate::discovery::DiscoveryStatus) {
    let refused: Vec<String> = d.refusals.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let _ = writeln!(
        out,
        "discovery: {}, resourceVersion {} from {}; {} list(s) ({} after 410 Gone), {} update(s) taken; refused: {}{}",
        d.state,
        or_dash(&d.resource_version),
        or_dash(&d.server),
        d.lists,
        d.expired,
        d.accepted,
        refused.join(", "),
        if d.last_error.is_empty() {
            String::new()
        } else {
            format!("; last error: {}", d.last_error)
        },
    );
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// The elected VIPs' table of `apilb status`, and the node's VRRP refusals.
fn render_elections(out: &mut String, snapshot: &Snapshot) {
    let elected: Vec<Vec<String>> = snapshot
        .vips
        .iter()
        .filter_map(|v| {
            let e = v.election.as_ref()?;
            Some(vec![
                v.address.ip().to_string(),
                e.mode.clone(),
                e.state.clone(),
                e.priority.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                e.transitions.to_string(),
                match (e.reason.is_empty(), e.held.is_empty()) {
                    (_, false) => format!("{} (held: {})", e.reason, e.held),
                    (true, true) => "-".to_owned(),
                    (false, true) => e.reason.clone(),
                },
            ])
        })
        .collect();
    if !elected.is_empty() {
        out.push('\n');
        write_table(
            out,
            &[
                ("ELECTED VIP", Align::Left),
                ("MODE", Align::Left),
                ("STATE", Align::Left),
                ("PRIORITY", Align::Right),
                ("CHANGES", Align::Right),
                ("LAST CHANGE", Align::Left),
            ],
            &elected,
        );
        let rejected: Vec<(String, u64)> = vrrp_rejections(&snapshot.vips)
            .unwrap_or_default()
            .into_iter()
            .collect();
        if let Some(list) = non_zero(&rejected) {
            let _ = writeln!(out, "VRRP adverts refused: {list}");
        }
    }
}

/// The sync peers' table of `apilb status`, and what no peer can be blamed for.
fn render_sync(out: &mut String, sync: &SyncSnapshot) {
    let peers: Vec<Vec<String>> = sync
        .peers
        .iter()
        .map(|p| {
            let mut export = link_state(&p.export);
            if p.needs_resync {
                export.push_str(", resync due");
            }
            vec![
                p.name.clone(),
                export,
                link_state(&p.import),
                (p.export.received.records + p.import.received.records).to_string(),
                (p.export.sent.records + p.import.sent.records).to_string(),
                non_zero(&p.rejected).unwrap_or_else(|| "-".to_owned()),
                last_errors(p),
            ]
        })
        .collect();
    out.push('\n');
    write_table(
        out,
        &[
            ("SYNC PEER", Align::Left),
            ("EXPORT", Align::Left),
            ("IMPORT", Align::Left),
            ("RECORDS IN", Align::Right),
            ("RECORDS OUT", Align::Right),
            ("REJECTED", Align::Left),
            ("LAST ERROR", Align::Left),
        ],
        &peers,
    );
    if let Some(list) = non_zero(&sync.unattributed) {
        let _ = writeln!(
            out,
            "Sync connections refused before a peer was known: {list}"
        );
    }
    if sync.events_lost > 0 {
        let _ = writeln!(
            out,
            "Sync flow events lost before reaching the peers: {}",
            sync.events_lost
        );
    }
}

/// A link's state, with its lag while it is up.
fn link_state(link: &SyncLinkStatus) -> String {
    if link.state == "up" {
        format!("up, lag {:.1} ms", link.lag_seconds * 1000.0)
    } else {
        link.state.clone()
    }
}

/// `reason n, reason n` of the non-zero counts, if there are any.
fn non_zero(counts: &[(String, u64)]) -> Option<String> {
    let list: Vec<String> = counts
        .iter()
        .filter(|&&(_, n)| n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    (!list.is_empty()).then(|| list.join(", "))
}

/// Why each link's last session or attempt ended, or `-`.
fn last_errors(p: &SyncPeerStatus) -> String {
    let errors: Vec<String> = [("export", &p.export), ("import", &p.import)]
        .into_iter()
        .filter_map(|(name, link)| Some(format!("{name}: {}", link.last_error.as_ref()?)))
        .collect();
    if errors.is_empty() {
        "-".to_owned()
    } else {
        errors.join("; ")
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// `n` bytes in binary units with one decimal, e.g. `1.2 MiB`; exact below 1 KiB.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Writes `rows` under `columns`, each column as wide as its widest cell, two
/// spaces apart, without trailing blanks.
fn write_table(out: &mut String, columns: &[(&str, Align)], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = columns.iter().map(|(name, _)| name.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header = columns.iter().map(|(name, _)| (*name).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, ((_, align), width))) in
            row.iter().zip(columns.iter().zip(&widths)).enumerate()
        {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = match align {
                Align::Left => write!(line, "{cell:<width$}"),
                Align::Right => write!(line, "{cell:>width$}"),
            };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}
