//! Validating a configuration as a whole, before anything is bound: every error names its field.

use super::*;

impl AgentConfig {
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.node_name {
            self.node.name = v.clone();
        }
        if let Some(v) = &o.data_dir {
            self.node.data_dir = v.clone();
        }
        if let Some(v) = &o.listen {
            self.node.listen = v.clone();
        }
        if let Some(v) = o.worker_threads {
            self.node.worker_threads = v;
        }
        if let Some(v) = o.log_format {
            self.log.format = v;
        }
        if let Some(v) = &o.log_level {
            self.log.level = v.clone();
        }
        if let Some(v) = &o.gpus_fixture {
            self.gpus.fixture = Some(v.clone());
        }
        if let Some(v) = &o.join_token {
            self.cluster.join_token = v.clone();
        }
    }

    /// Checks every value that can be checked without touching the filesystem or network.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let node_name = if self.node.name.is_empty() {
            host_name()
        } else {
            self.node.name.clone()
        };
        pki::validate_node_name(&node_name).map_err(|e| {
            let hint = if self.node.name.is_empty() {
                " (derived from the host name; set node.name)"
            } else {
                ""
            };
            ConfigError::new("node.name", format!("{e}{hint}"))
        })?;
        if self.node.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("node.data_dir", "must not be empty"));
        }
        let listen: SocketAddr = self.node.listen.parse().map_err(|_| {
            ConfigError::new(
                "node.listen",
                format!(
                    "{:?} is not an IP:port address (e.g. {DEFAULT_LISTEN})",
                    self.node.listen
                ),
            )
        })?;
        let advertise = if self.node.advertise.is_empty() {
            (!listen.ip().is_unspecified()).then_some(listen)
        } else {
            let a: SocketAddr = self.node.advertise.parse().map_err(|_| {
                ConfigError::new(
                    "node.advertise",
                    format!("{:?} is not an IP:port address", self.node.advertise),
                )
            })?;
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(ConfigError::new(
                    "node.advertise",
                    "must be a reachable address with a port",
                ));
            }
            Some(a)
        };
        let seeds = self
            .cluster
            .seeds
            .iter()
            .map(|s| parse_seed(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new("cluster.seeds", e))?;
        if !self.cluster.join_token.is_empty() {
            pki::JoinToken::parse(&self.cluster.join_token)
                .map_err(|e| ConfigError::new("cluster.join_token", e.to_string()))?;
            if seeds.is_empty() {
                return Err(ConfigError::new(
                    "cluster.join_token",
                    "a join token needs cluster.seeds: the agents to enroll through",
                ));
            }
        }
        let admin_listen: SocketAddr = self.admin.listen.parse().map_err(|_| {
            ConfigError::new(
                "admin.listen",
                format!("{:?} is not an IP:port address", self.admin.listen),
            )
        })?;
        let serving_listen = self.serving.validate()?;
        self.drivers.vllm.validate()?;
        let admin_socket = self
            .admin
            .socket
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join(ADMIN_SOCKET_FILE));
        if ![1, 3, 5].contains(&self.cluster.voters) {
            return Err(ConfigError::new("cluster.voters", "must be 1, 3 or 5"));
        }
        let c = &self.cluster;
        if !(10..=60_000).contains(&c.heartbeat_ms) {
            return Err(ConfigError::new(
                "cluster.heartbeat_ms",
                "must be between 10 and 60000",
            ));
        }
        if c.suspect_after_ms < 2 * c.heartbeat_ms {
            return Err(ConfigError::new(
                "cluster.suspect_after_ms",
                "must be at least two heartbeats",
            ));
        }
        if c.down_after_ms <= c.suspect_after_ms {
            return Err(ConfigError::new(
                "cluster.down_after_ms",
                "must be above suspect_after_ms",
            ));
        }
        let r = &self.raft;
        if !(10..=10_000).contains(&r.heartbeat_ms) {
            return Err(ConfigError::new(
                "raft.heartbeat_ms",
                "must be between 10 and 10000",
            ));
        }
        if r.election_timeout_min_ms < 3 * r.heartbeat_ms {
            return Err(ConfigError::new(
                "raft.election_timeout_min_ms",
                "must be at least 3 heartbeats",
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms
            || r.election_timeout_max_ms > 60_000
        {
            return Err(ConfigError::new(
                "raft.election_timeout_max_ms",
                "must be above election_timeout_min_ms and at most 60000",
            ));
        }
        if r.snapshot_after_entries < 10 {
            return Err(ConfigError::new(
                "raft.snapshot_after_entries",
                "must be at least 10",
            ));
        }
        if !(10..=600_000).contains(&r.coordinator_interval_ms) {
            return Err(ConfigError::new(
                "raft.coordinator_interval_ms",
                "must be between 10 and 600000",
            ));
        }
        if !(5_000..=600_000).contains(&r.autoplan_interval_ms) {
            return Err(ConfigError::new(
                "raft.autoplan_interval_ms",
                "must be between 5000 and 600000",
            ));
        }
        if self.node.worker_threads > 1024 {
            return Err(ConfigError::new(
                "node.worker_threads",
                "must be at most 1024 (0 = one per core)",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::new(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            )
        })?;
        self.transport
            .validate("transport")
            .map_err(|e| ConfigError::new(e.field, e.why))?;
        let pki_dir = self.node.data_dir.join("pki");
        let pick =
            |v: &Option<PathBuf>, file: &str| v.clone().unwrap_or_else(|| pki_dir.join(file));
        Ok(Validated {
            config: self.clone(),
            node_name,
            listen,
            advertise,
            seeds,
            admin_listen,
            admin_socket,
            serving_listen,
            models_dir: if self.node.models_dir.as_os_str().is_empty() {
                self.node.data_dir.join("models")
            } else {
                self.node.models_dir.clone()
            },
            ca_cert: pick(&self.tls.ca_cert, pki::CA_CERT_FILE),
            node_cert: pick(&self.tls.node_cert, pki::NODE_CERT_FILE),
            node_key: pick(&self.tls.node_key, pki::NODE_KEY_FILE),
        })
    }
}

impl ServingSection {
    fn validate(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let listen = if self.listen.is_empty() {
            None
        } else {
            Some(self.listen.parse().map_err(|_| {
                ConfigError::new(
                    "serving.listen",
                    format!(
                        "{:?} is not an IP:port address (e.g. {DEFAULT_SERVING_LISTEN}; empty for none)",
                        self.listen
                    ),
                )
            })?)
        };
        let range = |field: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::new(
                    format!("serving.{field}"),
                    format!("must be between {lo} and {hi}"),
                ))
            }
        };
        range("inflight_max", self.inflight_max.into(), 1, 1_000_000)?;
        range(
            "header_read_timeout_ms",
            self.header_read_timeout_ms,
            100,
            3_600_000,
        )?;
        range(
            "body_read_timeout_ms",
            self.body_read_timeout_ms,
            100,
            3_600_000,
        )?;
        range("connections_max", self.connections_max.into(), 1, 1_000_000)?;
        range(
            "kv_inbox_bytes_max",
            self.kv_inbox_bytes_max,
            1 << 20,
            1 << 50,
        )?;
        range("kv_unclaimed_ms", self.kv_unclaimed_ms, 1_000, 3_600_000)?;
        range(
            "kv_stall_timeout_ms",
            self.kv_stall_timeout_ms,
            100,
            600_000,
        )?;
        range(
            "kv_link_floor_mbit_s",
            self.kv_link_floor_mbit_s,
            1,
            10_000_000,
        )?;
        range("body_bytes_max", self.body_bytes_max, 1024, 1 << 30)?;
        range("max_tokens_max", self.max_tokens_max.into(), 1, 10_000_000)?;
        range(
            "max_tokens_default",
            self.max_tokens_default.into(),
            1,
            self.max_tokens_max.into(),
        )?;
        range(
            "request_timeout_ms",
            self.request_timeout_ms,
            100,
            86_400_000,
        )?;
        range("retries", self.retries.into(), 0, 10)?;
        range("migrations", self.migrations.into(), 0, 10)?;
        range("circuit_open_ms", self.circuit_open_ms, 0, 3_600_000)?;
        range("view_refresh_ms", self.view_refresh_ms, 10, 60_000)?;
        self.policy
            .parse::<pd_router::Policy>()
            .map_err(|e| ConfigError::new("serving.policy", e.to_string()))?;
        Ok(listen)
    }
}
