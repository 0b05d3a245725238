//! Reading and verifying the audit log (api.md §9).

use crate::{require, App, AppError};
use nexplane_domain::audit::{AuditEvent, ChainCheck, ChainVerifier};
use nexplane_domain::{Permission, Principal};
use nexplane_ports::{transaction, AuditFilter, Page, Repo};

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
        transaction(self.store(), |r: &mut dyn Repo| {
            r.list_audit(filter, page).map_err(AppError::from)
        })
    }

    /// `GET /audit/verify` (admin): walks the whole chain in batches.
    pub fn verify_audit(&self, p: &Principal) -> Result<ChainCheck, AppError> {
        require(p, Permission::AuditVerify)?;
        let mut verifier = ChainVerifier::default();
        let mut after = 0i64;
        loop {
            let batch = transaction(self.store(), |r: &mut dyn Repo| {
                r.scan_audit(after, VERIFY_BATCH).map_err(AppError::from)
            })?;
            let Some(last) = batch.last() else { break };
            after = last.seq;
            let full = batch.len() as u32 == VERIFY_BATCH;
            for ev in &batch {
                if !verifier.push(ev) {
                    return Ok(verifier.finish());
                }
            }
            if !full {
                break;
            }
        }
        Ok(verifier.finish())
    }
}
