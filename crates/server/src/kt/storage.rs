//! akd's storage trait (`akd::storage::Database`) implemented once over the backend-neutral
//! [`TransparencyStore`], so every backend that implements that trait holds an akd directory.
//! Not for: caching or transactions (akd's `StorageManager` wraps this with both).

use std::collections::HashMap;
use std::sync::Arc;

use akd::errors::StorageError;
use akd::storage::types::{
    DbRecord, KeyData, StorageType, ValueState, ValueStateKey, ValueStateRetrievalFlag,
};
use akd::storage::{Database, DbSetState, Storable};
use akd::{AkdLabel, AkdValue};
use async_trait::async_trait;

use super::codec;
use crate::store::{AkdNodeRow, AkdValueRow, StoreError, TransparencyStore};

/// akd's view of a [`TransparencyStore`].
#[derive(Clone)]
pub struct AkdStorage {
    store: Arc<dyn TransparencyStore>,
}

impl AkdStorage {
    /// akd storage over `store`.
    pub fn new(store: Arc<dyn TransparencyStore>) -> Self {
        Self { store }
    }

    async fn states(&self, label: &AkdLabel) -> Result<Vec<ValueState>, StorageError> {
        let rows = self
            .store
            .akd_values(label.0.clone())
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| codec::decode_value(&row.data).map_err(StorageError::Other))
            .collect()
    }
}

fn backend(e: StoreError) -> StorageError {
    StorageError::Connection(e.to_string())
}

fn not_found(what: impl std::fmt::Debug) -> StorageError {
    StorageError::NotFound(format!("{what:?}"))
}

/// Picks the state `flag` asks for from states ordered by epoch.
fn select(states: Vec<ValueState>, flag: ValueStateRetrievalFlag) -> Option<ValueState> {
    use ValueStateRetrievalFlag as F;
    match flag {
        F::MaxEpoch => states.into_iter().max_by_key(|s| s.epoch),
        F::MinEpoch => states.into_iter().min_by_key(|s| s.epoch),
        F::SpecificVersion(v) => states.into_iter().find(|s| s.version == v),
        F::SpecificEpoch(e) => states.into_iter().find(|s| s.epoch == e),
        F::LeqEpoch(e) => states
            .into_iter()
            .filter(|s| s.epoch <= e)
            .max_by_key(|s| s.epoch),
    }
}

#[async_trait]
impl Database for AkdStorage {
    async fn set(&self, record: DbRecord) -> Result<(), StorageError> {
        self.batch_set(vec![record], DbSetState::General).await
    }

    async fn batch_set(
        &self,
        records: Vec<DbRecord>,
        _state: DbSetState,
    ) -> Result<(), StorageError> {
        let mut nodes = Vec::new();
        let mut values = Vec::new();
        for record in &records {
            match record {
                DbRecord::ValueState(state) => values.push(AkdValueRow {
                    label: state.username.0.clone(),
                    epoch: state.epoch,
                    version: state.version,
                    data: codec::encode_value(state),
                }),
                other => nodes.push(AkdNodeRow {
                    key: other.get_full_binary_id(),
                    data: codec::encode_node(other)
                        .ok_or_else(|| StorageError::Other("unencodable record".into()))?,
                }),
            }
        }
        // One call, one transaction: a publish's records commit together or not at all.
        self.store.akd_write(nodes, values).await.map_err(backend)
    }

    async fn get<St: Storable>(&self, id: &St::StorageKey) -> Result<DbRecord, StorageError> {
        let key = St::get_full_binary_key_id(id);
        if St::data_type() == StorageType::ValueState {
            let ValueStateKey(label, epoch) =
                ValueState::key_from_full_binary(&key).map_err(StorageError::Other)?;
            return select(
                self.states(&AkdLabel(label)).await?,
                ValueStateRetrievalFlag::SpecificEpoch(epoch),
            )
            .map(DbRecord::ValueState)
            .ok_or_else(|| not_found(id));
        }
        let mut rows = self.store.akd_nodes(vec![key]).await.map_err(backend)?;
        match rows.pop() {
            Some(row) => codec::decode_node(&row.data).map_err(StorageError::Other),
            None => Err(not_found(id)),
        }
    }

    async fn batch_get<St: Storable>(
        &self,
        ids: &[St::StorageKey],
    ) -> Result<Vec<DbRecord>, StorageError> {
        if St::data_type() == StorageType::ValueState {
            let mut found = Vec::new();
            for id in ids {
                match self.get::<St>(id).await {
                    Ok(record) => found.push(record),
                    Err(StorageError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(found);
        }
        let keys = ids.iter().map(St::get_full_binary_key_id).collect();
        let rows = self.store.akd_nodes(keys).await.map_err(backend)?;
        rows.iter()
            .map(|row| codec::decode_node(&row.data).map_err(StorageError::Other))
            .collect()
    }

    async fn get_user_data(&self, username: &AkdLabel) -> Result<KeyData, StorageError> {
        let states = self.states(username).await?;
        if states.is_empty() {
            return Err(not_found(username));
        }
        Ok(KeyData { states })
    }

    async fn get_user_state(
        &self,
        username: &AkdLabel,
        flag: ValueStateRetrievalFlag,
    ) -> Result<ValueState, StorageError> {
        select(self.states(username).await?, flag).ok_or_else(|| not_found(username))
    }

    async fn get_user_state_versions(
        &self,
        usernames: &[AkdLabel],
        flag: ValueStateRetrievalFlag,
    ) -> Result<HashMap<AkdLabel, (u64, AkdValue)>, StorageError> {
        let mut found = HashMap::new();
        for username in usernames {
            if let Some(state) = select(self.states(username).await?, flag) {
                found.insert(username.clone(), (state.version, state.value));
            }
        }
        Ok(found)
    }
}
