//! Sandboxes: named network namespaces berth makes and removes (`berth sandbox`), with their
//! endpoints and resolv.conf.

use std::path::{Path, PathBuf};

use berth_dataplane::netns;
use berth_model::{Sandbox, validate_sandbox_name};
use berth_store::{Compare, Txn, TxnOutcome};

use crate::{Agent, AgentError, Result, already_exists, encode, kernel, keys};

pub(crate) fn removing(sandbox: &str) -> AgentError {
    AgentError::Conflict(format!("sandbox {sandbox:?} is being removed"))
}

impl Agent {
    pub async fn sandboxes(&self) -> Result<Vec<Sandbox>> {
        self.load_all(keys::SANDBOXES).await
    }

    pub async fn sandbox(&self, name: &str) -> Result<Sandbox> {
        self.load::<Sandbox>(&keys::sandbox(name))
            .await?
            .map(|(s, _)| s)
            .ok_or_else(|| AgentError::NotFound(format!("no sandbox named {name:?}")))
    }

    pub async fn create_sandbox(&self, name: &str) -> Result<Sandbox> {
        validate_sandbox_name(name)?;
        let path = self.netns_dir.join(name);
        let sb = Sandbox {
            name: name.to_string(),
            path: path.display().to_string(),
            removing: false,
        };
        let txn = Txn::new()
            .when(Compare::Absent(keys::sandbox(name)))
            .put(keys::sandbox(name), encode(&sb));
        if let TxnOutcome::CompareFailed(_) = self.commit(txn).await? {
            return Err(AgentError::Conflict(format!(
                "sandbox {name:?} already exists"
            )));
        }
        if let Err(e) = kernel(move || netns::create(&path)).await {
            self.commit(Txn::new().delete(keys::sandbox(name))).await?;
            if already_exists(&e) {
                return Err(AgentError::Conflict(format!(
                    "{} already exists and is not a berth sandbox",
                    sb.path
                )));
            }
            return Err(e);
        }
        tracing::info!(sandbox = %name, path = %sb.path, "sandbox created");
        Ok(sb)
    }

    /// Detaches the sandbox from every network, then removes its namespace.
    pub async fn delete_sandbox(&self, name: &str) -> Result<()> {
        let _topology = self.topology.read().await;
        let sb = self.mark_removing(name).await?;
        self.finish_sandbox_removal(&sb).await
    }

    /// The removal of a sandbox marked `removing`: its endpoints, its resolv.conf, its
    /// namespace, then its record. Also what reconcile does for a removal a stop cut short.
    pub(crate) async fn finish_sandbox_removal(&self, sb: &Sandbox) -> Result<()> {
        if let Some(id) = netns::id_at(Path::new(&sb.path)) {
            for ep in self.endpoints_in(&id).await? {
                self.remove_endpoint(&ep).await?;
            }
        }
        self.remove_sandbox_resolv_conf(&sb.name);
        let path = PathBuf::from(&sb.path);
        kernel(move || netns::remove(&path)).await?;
        self.commit(Txn::new().delete(keys::sandbox(&sb.name)))
            .await?;
        tracing::info!(sandbox = %sb.name, "sandbox removed");
        Ok(())
    }

    /// Marks a sandbox as being removed. An attach checks the sandbox's record in its commit,
    /// so once this commits, every attach either committed before (and its endpoint is found
    /// and removed) or fails.
    async fn mark_removing(&self, name: &str) -> Result<Sandbox> {
        loop {
            let (mut sb, rev) = self
                .load::<Sandbox>(&keys::sandbox(name))
                .await?
                .ok_or_else(|| AgentError::NotFound(format!("no sandbox named {name:?}")))?;
            if sb.removing {
                return Ok(sb);
            }
            sb.removing = true;
            let txn = Txn::new()
                .when(Compare::ModRevision(keys::sandbox(name), rev))
                .put(keys::sandbox(name), encode(&sb));
            if let TxnOutcome::Committed { .. } = self.commit(txn).await? {
                return Ok(sb);
            }
        }
    }
}
