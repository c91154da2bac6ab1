#![doc = include_str!("../README.md")]

use proc_macro::TokenStream;

mod args;
mod expand;
mod signature;

#[doc = include_str!("../doc/tool.md")]
#[proc_macro_attribute]
pub fn tool(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::tool(attr.into(), item.into()).into()
}

#[doc = include_str!("../doc/toolkit.md")]
#[proc_macro_attribute]
pub fn toolkit(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::toolkit(attr.into(), item.into()).into()
}
