//! The asset inventory (api.md §5): listing with filters and reading one asset.

use crate::{require, App, AppError};
use nexplane_domain::{Asset, AssetId, Permission, Principal};
use nexplane_ports::{transaction, AssetFilter, Page, Repo};

/// Longest accepted `q` (substring search), in characters.
pub const MAX_QUERY_CHARS: usize = 200;

fn not_found(id: &str) -> AppError {
    AppError::NotFound(format!("no asset {id}"))
}

impl App {
    /// `GET /assets` (any role), newest first. Removed assets are left out unless
    /// `filter.include_removed`.
    pub fn list_assets(
        &self,
        p: &Principal,
        filter: &AssetFilter,
        page: &Page,
    ) -> Result<Vec<Asset>, AppError> {
        require(p, Permission::Read)?;
        if filter
            .q
            .as_deref()
            .is_some_and(|q| q.chars().count() > MAX_QUERY_CHARS)
        {
            return Err(AppError::field(
                "q",
                &format!("must be at most {MAX_QUERY_CHARS} characters"),
            ));
        }
        transaction(self.store(), |r: &mut dyn Repo| {
            r.list_assets(filter, page).map_err(AppError::from)
        })
    }

    /// `GET /assets/{id}` (any role; an unknown or malformed id is a 404). Removed assets
    /// are still readable by id.
    pub fn get_asset(&self, p: &Principal, id: &str) -> Result<Asset, AppError> {
        require(p, Permission::Read)?;
        let aid = AssetId::parse(id).map_err(|_| not_found(id))?;
        transaction(self.store(), |r: &mut dyn Repo| {
            r.get_asset(&aid).map_err(AppError::from)
        })?
        .ok_or_else(|| not_found(id))
    }
}
