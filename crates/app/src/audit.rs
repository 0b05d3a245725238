//! Reading and verifying the audit log (api.md §9).

use crate::{require, App, AppError};
use nexplane_domain::audit::{AuditEvent, ChainCheck, ChainVerifier};
use nexplane_domain::{Permission, Principal};
use nexplane_ports::{transaction, AuditFilter, Page, Repo, StoreError};

/// Events read per batch while verifying.
const VERIFY_BATCH: u32 = 1000;

impl App {
    /// `GET /audit` (any role).
    pub fn list_audit(
        &self,
        p: &Principal,
        filter: &AuditFilter,
        page: &Page,
    ) -> Result<Vec<AuditEvent>, AppError> {
        require(p, Permission::Read)?;
        if let (Some(from), Some(to)) = (filter.from, filter.to) {
            if to < from {
                return Err(AppError::field("to", "must not be before from"));
            }
        }
        nexplane_ports::read(self.store(), |r: &mut dyn Repo| {
            r.list_audit(filter, page).map_err(AppError::from)
        })
    }

    /// `GET /audit/verify` (admin): walks the whole chain in batches. A stored row that can
    /// no longer be read as an event (say its payload was overwritten with text that is not
    /// JSON) has been tampered with too, so it is reported as the first bad row rather than
    /// failing the request.
    pub fn verify_audit(&self, p: &Principal) -> Result<ChainCheck, AppError> {
        require(p, Permission::AuditVerify)?;
        let mut verifier = ChainVerifier::default();
        // Every event up to `after` has verified, so the next expected one is `after + 1`.
        let mut after = 0i64;
        let mut batch_size = VERIFY_BATCH;
        loop {
            let read = transaction(self.store(), |r: &mut dyn Repo| {
                r.scan_audit(after, batch_size)
            });
            let batch = match read {
                Ok(batch) => batch,
                Err(StoreError::Other(_)) if batch_size > 1 => {
                    // Some row of this batch is unreadable: go on one row at a time to find it.
                    batch_size = 1;
                    continue;
                }
                Err(StoreError::Other(e)) => {
                    tracing::warn!(seq = after + 1, error = %e, "unreadable audit row");
                    return Ok(ChainCheck::Broken {
                        first_bad_seq: after + 1,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let Some(last) = batch.last() else { break };
            let full = batch.len() as u32 == batch_size;
            for ev in &batch {
                if !verifier.push(ev) {
                    return Ok(verifier.finish());
                }
            }
            after = last.seq;
            if !full {
                break;
            }
        }
        Ok(verifier.finish())
    }
}
