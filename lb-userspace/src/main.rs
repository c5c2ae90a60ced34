//! `apilb`: the Kubernetes apiserver load balancer. This file is only the command
//! line; every behaviour lives in the library modules it calls.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    admin::{client, table},
    capacity,
    config::{self, Config},
    daemon::{self, RunOptions},
    loader,
    manifest::{self, Form},
};

// `name`: without it clap names the program after the package, `lb-userspace`.
#[derive(Parser)]
#[command(
    name = "apilb",
    version,
    about = "Kernel (XDP) load balancer for the Kubernetes API server"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load (or adopt) the datapath, probe the masters and keep the maps true.
    ///
    /// SIGHUP reloads the config (a refused one changes nothing). SIGTERM or SIGINT
    /// exits, leaving the pinned datapath balancing unless --detach-on-exit.
    Run {
        /// The config file (TOML; see examples/apilb.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// Detach the datapath and remove its pins on exit.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Validate a config file without touching the kernel; exit non-zero if it is
    /// refused, naming the key and value at fault.
    Check {
        /// The config file (TOML; see examples/apilb.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// Check on a machine that is not the node (a config pipeline): look up no
        /// interface, read no file the config names, ask the kernel nothing; list
        /// what was therefore not checked.
        #[arg(long)]
        offline: bool,
    },
    /// Print a ready deployment for a config: a static pod, a daemonset (node-local
    /// mode) or a systemd unit, with exactly apilb's capabilities and the files the
    /// config names mounted. The config is validated first; a refused one prints
    /// nothing.
    Manifest {
        /// What to print.
        #[arg(value_enum)]
        form: Form,
        /// The config file (TOML; see examples/apilb.toml), at the path the node has it.
        #[arg(short, long)]
        config: PathBuf,
        /// The container image (static-pod and daemonset); default apilb:<version>,
        /// as `cargo xtask image` builds it.
        #[arg(long)]
        image: Option<String>,
    },
    /// Print a shell completion script, e.g. `apilb completions bash >
    /// /etc/bash_completion.d/apilb`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, apilb(1), as roff: `apilb man | man -l -`.
    Man,
    /// Show a running apilb's VIPs, backends, health and traffic (from its /status).
    Status {
        /// The admin endpoint (the config's admin.listen).
        #[arg(long, default_value_t = config::ADMIN_LISTEN_DEFAULT)]
        admin: std::net::SocketAddr,
    },
    /// Detach an instance's datapath, remove its pins and restore the node
    /// settings it changed (`accept_local`, the reserved NAT ports).
    Detach {
        /// The instance, as in the config's `instance` key.
        #[arg(long, default_value = config::INSTANCE_DEFAULT)]
        instance: String,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apilb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("APILB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: journald and log files would keep
    // the escape sequences.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            detach_on_exit,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let opts = RunOptions {
                config_path: config,
                detach_on_exit,
            };
            runtime.block_on(daemon::run(&opts))?;
        }
        Command::Check { config, offline } => {
            let (c, skipped) = if offline {
                Config::load_offline(&config)
            } else {
                Config::load(&config).map(|c| (c, Vec::new()))
            }
            .with_context(|| format!("{} is refused", config.display()))?;
            println!(
                "{}: valid: {} VIP(s), {} backend(s), interfaces {}, health {} every {:?}",
                config.display(),
                c.vips.len(),
                c.backends.len(),
                c.datapath.interfaces.join(","),
                c.health.kind.name(),
                c.health.interval,
            );
            if let Some(d) = &c.discovery {
                println!("{}", d.describe());
            }
            let capacity = capacity::report(&c);
            for line in &capacity.lines {
                println!("{line}");
            }
            let node_warnings = if offline {
                Vec::new()
            } else {
                c.node_warnings()
            };
            let warnings = node_warnings.into_iter().chain(c.timeout_warnings());
            for warning in warnings.chain(capacity.warnings) {
                println!("warning: {warning}");
            }
            for what in skipped {
                println!("offline, not checked: {what}");
            }
        }
        Command::Manifest {
            form,
            config,
            image,
        } => {
            let c = Config::load(&config)
                .with_context(|| format!("{} is refused", config.display()))?;
            let text = manifest::render(form, &c, &config, image.as_deref())?;
            print!("{text}");
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "apilb", &mut std::io::stdout());
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
        }
        Command::Status { admin } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let snapshot = runtime.block_on(client::fetch_status(admin))?;
            print!("{}", table::render_status(&snapshot));
        }
        Command::Detach { instance } => {
            let dir = loader::pin_dir(&instance);
            let done =
                loader::detach(&dir).with_context(|| format!("detaching {}", dir.display()))?;
            if done.removed.is_empty() {
                println!("nothing pinned at {}", dir.display());
            }
            for p in done.removed {
                println!("removed {}", p.display());
            }
            for setting in done.restored {
                println!("restored {setting}");
            }
            for setting in done.left {
                println!("left {setting}");
            }
        }
        // The same line as `--version`, from the same place.
        Command::Version => print!("{}", Cli::command().render_version()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verbs() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect()
    }

    #[test]
    fn the_man_page_names_every_verb() {
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut page)
            .expect("render");
        let page = String::from_utf8(page).expect("utf-8");
        let verbs = verbs();
        println!("{} verbs, man page of {} bytes", verbs.len(), page.len());
        for verb in &verbs {
            assert!(
                page.contains(&format!("apilb\\-{verb}(1)")),
                "{verb} in:\n{page}"
            );
        }
        assert!(verbs.iter().any(|v| v == "manifest"), "{verbs:?}");
    }

    #[test]
    fn the_bash_completion_offers_manifest_and_its_forms() {
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "apilb",
            &mut script,
        );
        let script = String::from_utf8(script).expect("utf-8");
        for word in [
            "manifest",
            "static-pod",
            "daemonset",
            "systemd",
            "completions",
        ] {
            assert!(script.contains(word), "{word}");
        }
    }
}
