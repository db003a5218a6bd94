//! Raw layer: C types ([`types`]), the function table ([`table::Api`]) and
//! its loader ([`load`]). Nothing here checks a status code; see
//! [`crate::result`].

pub mod load;
pub mod table;
pub mod types;

#[cfg(ascendcl_bindgen)]
pub mod checked;

pub use load::{api, install, is_present, LoadError};
pub use table::Api;
pub use types::*;
