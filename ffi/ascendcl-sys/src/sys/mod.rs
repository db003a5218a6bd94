//! Raw layer: C types ([`types`]), the function table ([`table::Api`]) and
//! its loader ([`load`]). Nothing here checks a status code; see
//! [`crate::result`].

/// Pins table functions to a bindgen `dynamic_library_name` struct: each
/// listed field must have exactly the type of [`table::sig`]'s alias (same
/// parameter types, same constness, same return type), or the crate does
/// not compile. Used by the committed bindings ([`bindings`]) and by the
/// `cann` feature's bindings of the installed headers ([`checked`]).
#[allow(unused_macros)]
macro_rules! pin_table {
    ($lib:ty; $($f:ident),* $(,)?) => {
        #[allow(dead_code, non_snake_case, clippy::all)]
        fn _pin_table(lib: &$lib) {
            $( let _: crate::sys::table::sig::$f = lib.$f; )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use pin_table;

pub mod load;
pub mod roots;
pub mod table;
pub mod types;

#[cfg(test)]
mod bindings;
#[cfg(ascendcl_bindgen)]
pub mod checked;

pub use load::{api, install, is_present, LoadError};
pub use table::Api;
pub use types::*;
