//! Every server the benchmark measures, started together on loopback, and the throughput cases
//! run against them; apart from the entry point so the run reads as steps.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use anyhow::Result;

use super::{
    load::{GRPC_CONCURRENCY, HTTP_CONCURRENCY, grpc_args, http_args},
    servers::{Server, http_body, start_floor, start_service},
};

/// Every server the benchmark measures, each on loopback: the services in the configurations
/// compared, and the floors.
pub(super) struct Stack {
    pub(super) rec_mtls: Server,
    rec_plain: Server,
    rec_text: Server,
    rec_every_call: Server,
    rec_big: Server,
    pub(super) market: Server,
    /// The same marketplace with MAX_REQUESTS_IN_FLIGHT out of the way, for the overload rows.
    pub(super) market_unlimited: Server,
    floor_mtls: Server,
    floor_plain: Server,
    pub(super) floor_page: Server,
    floor_chain: Server,
    /// The chain floor calling the real recommendations: the page against it is the
    /// marketplace's own cost alone.
    floor_chain_real: Server,
}

impl Stack {
    pub(super) async fn start(
        bin: &Path,
        certs: &Path,
        catalog: &Path,
        work: &Path,
    ) -> Result<Stack> {
        let loadgen = bin.join("loadgen");
        let recommendations = bin.join("recommendations");
        let certs_env = ("CERTS_DIR", certs.display().to_string());
        let with_certs = |extra: &[(&'static str, String)]| {
            let mut env = vec![certs_env.clone()];
            env.extend_from_slice(extra);
            env
        };
        let rec = |name: &'static str, env: Vec<(&'static str, String)>| {
            let recommendations = recommendations.clone();
            async move { start_service(name, &recommendations, &env, work).await }
        };
        let rec_mtls = rec("recommendations", with_certs(&[])).await?;
        let rec_plain = rec(
            "recommendations (plaintext)",
            with_certs(&[("TLS_MODE", "off".into())]),
        )
        .await?;
        let rec_text = rec(
            "recommendations (text log)",
            with_certs(&[("LOG_FORMAT", "text".into())]),
        )
        .await?;
        let rec_every_call = rec(
            "recommendations (a line per call)",
            with_certs(&[("LOG_SAMPLE", "1".into())]),
        )
        .await?;
        let rec_big = rec(
            "recommendations (big catalog)",
            with_certs(&[("CATALOG_PATH", catalog.display().to_string())]),
        )
        .await?;
        let backend = [
            ("RECOMMENDATIONS_HOST", "127.0.0.1".into()),
            ("RECOMMENDATIONS_PORT", rec_mtls.addr.port().to_string()),
            ("RECOMMENDATIONS_TLS_NAME", "localhost".into()),
        ];
        let market = start_service(
            "marketplace",
            &bin.join("marketplace"),
            &with_certs(&backend),
            work,
        )
        .await?;
        let mut unlimited = backend.to_vec();
        unlimited.push(("MAX_REQUESTS_IN_FLIGHT", "100000".into()));
        let market_unlimited = start_service(
            "marketplace (limit out of the way)",
            &bin.join("marketplace"),
            &with_certs(&unlimited),
            work,
        )
        .await?;
        let certs_arg = certs.display().to_string();
        let floor_mtls = start_floor(
            "floor-grpc (mTLS)",
            &loadgen,
            &["floor-grpc".into(), "--certs".into(), certs_arg.clone()],
        )
        .await?;
        let floor_plain = start_floor("floor-grpc", &loadgen, &["floor-grpc".into()]).await?;
        // The floors answer with the page the marketplace serves, byte for byte.
        let page = http_body(market.addr, "/").await?;
        let page_file = work.join("page.html");
        std::fs::write(&page_file, &page)?;
        let page_arg = page_file.display().to_string();
        let floor_page = start_floor(
            "floor-http",
            &loadgen,
            &["floor-http".into(), "--body-file".into(), page_arg.clone()],
        )
        .await?;
        let chain = |name, backend: SocketAddr| {
            let args = [
                "floor-chain".into(),
                "--backend".into(),
                backend.to_string(),
                "--certs".into(),
                certs_arg.clone(),
                "--body-file".into(),
                page_arg.clone(),
            ];
            let loadgen = loadgen.clone();
            async move { start_floor(name, &loadgen, &args).await }
        };
        let floor_chain = chain("floor-chain", floor_mtls.addr).await?;
        let floor_chain_real = chain("floor-chain (real backend)", rec_mtls.addr).await?;
        Ok(Stack {
            rec_mtls,
            rec_plain,
            rec_text,
            rec_every_call,
            rec_big,
            market,
            market_unlimited,
            floor_mtls,
            floor_plain,
            floor_page,
            floor_chain,
            floor_chain_real,
        })
    }

    /// Time from exec to ready, and memory at rest, of the servers whose figures are reported.
    pub(super) fn at_rest(&self) -> (BTreeMap<String, f64>, BTreeMap<String, u64>) {
        let mut idle_rss_kib = BTreeMap::new();
        let mut ready_ms = BTreeMap::new();
        for server in [
            &self.rec_mtls,
            &self.market,
            &self.rec_big,
            &self.floor_mtls,
            &self.floor_page,
        ] {
            if let Some(rss) = server.pid().and_then(bookstore_process::rss_kib) {
                idle_rss_kib.insert(server.name.clone(), rss);
            }
            if let Some(ready) = server.ready_after {
                ready_ms.insert(server.name.clone(), ready.as_secs_f64() * 1e3);
            }
        }
        (ready_ms, idle_rss_kib)
    }

    /// The throughput cases, in the order each round runs them. Each comparison's two cases
    /// run close together in each round: a floor runs once a round, just before the first case
    /// compared with it (the text-log and line-per-call cases are the third and fourth runs
    /// after it; the chain floor over the real recommendations is the second after the page,
    /// the constant page the third, the original's the fourth), so
    /// a drift of the machine between rounds touches both sides of a ratio alike.
    pub(super) fn cases<'a>(&'a self, certs: &Path, duration: f64) -> Vec<Case<'a>> {
        let grpc = |name, server: &'a Server, tls: bool| -> Case<'a> {
            let certs = tls.then_some(certs);
            (
                name,
                server,
                grpc_args(server, certs, GRPC_CONCURRENCY, duration),
                vec![server],
            )
        };
        let http = |name, server: &'a Server, behind: Option<&'a Server>| -> Case<'a> {
            let mut cpu = vec![server];
            cpu.extend(behind);
            (
                name,
                server,
                http_args(server, HTTP_CONCURRENCY, duration),
                cpu,
            )
        };
        vec![
            grpc("floor_grpc_mtls", &self.floor_mtls, true),
            grpc("recommend_mtls", &self.rec_mtls, true),
            grpc("recommend_mtls_big_catalog", &self.rec_big, true),
            grpc("recommend_mtls_text_log", &self.rec_text, true),
            grpc("recommend_mtls_every_call", &self.rec_every_call, true),
            grpc("recommend_plain", &self.rec_plain, false),
            grpc("floor_grpc_plain", &self.floor_plain, false),
            http("page", &self.market, Some(&self.rec_mtls)),
            http("floor_chain", &self.floor_chain, Some(&self.floor_mtls)),
            http(
                "floor_chain_real",
                &self.floor_chain_real,
                Some(&self.rec_mtls),
            ),
            http("floor_page", &self.floor_page, None),
        ]
    }

    pub(super) async fn stop(self) {
        for server in [
            self.rec_mtls,
            self.rec_plain,
            self.rec_text,
            self.rec_every_call,
            self.rec_big,
            self.market,
            self.market_unlimited,
            self.floor_chain,
            self.floor_chain_real,
            self.floor_mtls,
            self.floor_plain,
            self.floor_page,
        ] {
            server.stop().await;
        }
    }
}

/// A throughput case: its name, the server it loads, the load generator's arguments, and the
/// servers whose CPU it costs (the server and what it calls).
pub(super) type Case<'a> = (&'static str, &'a Server, Vec<String>, Vec<&'a Server>);
