//! The arguments of `#[tool(...)]` and `#[toolkit(...)]`.

use proc_macro2::TokenStream;
use syn::{LitStr, Path, meta::ParseNestedMeta, parse::Parser};

/// What `#[tool(...)]` says.
#[derive(Default)]
pub(crate) struct ToolArgs {
    pub name: Option<LitStr>,
    pub description: Option<LitStr>,
    pub auth_provider: Option<LitStr>,
    pub auth_type: Option<LitStr>,
    pub auth_with: Option<LitStr>,
    pub krate: Option<Path>,
}

impl ToolArgs {
    pub fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = Self::default();
        let parser = syn::meta::parser(|meta| {
            let slot = if meta.path.is_ident("name") {
                &mut args.name
            } else if meta.path.is_ident("description") {
                &mut args.description
            } else if meta.path.is_ident("auth_provider") {
                &mut args.auth_provider
            } else if meta.path.is_ident("auth_type") {
                &mut args.auth_type
            } else if meta.path.is_ident("auth_with") {
                &mut args.auth_with
            } else if meta.path.is_ident("crate") {
                return set_crate(&mut args.krate, &meta);
            } else {
                return Err(meta.error(
                    "unknown argument of `#[tool]`: use name, description, auth_provider, \
                     auth_type, auth_with or crate",
                ));
            };
            if slot.is_some() {
                return Err(meta.error("this argument is given twice"));
            }
            *slot = Some(meta.value()?.parse()?);
            Ok(())
        });
        parser.parse2(tokens)?;
        Ok(args)
    }
}

/// What `#[toolkit(...)]` says.
#[derive(Default)]
pub(crate) struct ToolkitArgs {
    pub krate: Option<Path>,
}

impl ToolkitArgs {
    pub fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = Self::default();
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("crate") {
                set_crate(&mut args.krate, &meta)
            } else {
                Err(meta.error("unknown argument of `#[toolkit]`: use crate"))
            }
        });
        parser.parse2(tokens)?;
        Ok(args)
    }
}

/// `crate = "path"` (as serde's) or `crate = path`.
fn set_crate(slot: &mut Option<Path>, meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if slot.is_some() {
        return Err(meta.error("this argument is given twice"));
    }
    let value = meta.value()?;
    let path = if value.peek(LitStr) {
        value.parse::<LitStr>()?.parse()?
    } else {
        Path::parse_mod_style(value)?
    };
    *slot = Some(path);
    Ok(())
}
