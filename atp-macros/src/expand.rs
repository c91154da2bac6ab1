//! The code `#[tool]` and `#[toolkit]` generate.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::{Attribute, ImplItem, ItemFn, ItemImpl, LitStr, Path, spanned::Spanned};

use crate::{
    args::{ToolArgs, ToolkitArgs},
    signature::{self, ArgKind, Errors, Place, Receiver, ToolFn},
};

/// `#[tool]` on a function.
pub(crate) fn tool(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut function: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let e = syn::Error::new(
                Span::call_site(),
                "`#[tool]` goes on a function (`async fn` or `fn`), or on the methods of a \
                 `#[toolkit]` impl block",
            );
            let error = e.to_compile_error();
            return quote!(#error #item);
        }
    };
    let mut errors = Errors::default();
    let args = ToolArgs::parse(attr).unwrap_or_else(|e| {
        errors.push(e);
        ToolArgs::default()
    });
    // Read even when the arguments are wrong: it takes the doc comments
    // off the function's arguments, which rustc would refuse.
    let read = signature::read(&function.attrs, &mut function.sig, args, Place::Free);
    let tool = match (read, errors.finish()) {
        (Ok(tool), Ok(())) => tool,
        // The function as it is (without its arguments' doc comments),
        // so that only the macro's errors are reported.
        (read, outcome) => {
            let mut errors = Errors::default();
            for e in [read.err(), outcome.err()].into_iter().flatten() {
                errors.push(e);
            }
            let error = errors.finish().err().map(|e| e.to_compile_error());
            return quote!(#error #function);
        }
    };
    let krate = crate_path(tool.args_given.krate.clone());
    let ident = &tool.ident;
    let vis = &function.vis;
    let def = tool_def(&tool, &krate, Callee::Free);
    let checks = checks(&tool, &krate);
    let imports = imports(&krate);
    let doc = format!(
        "The `{}` tool, to register: `client.register({ident}::tool())`.",
        tool.name.value()
    );
    quote! {
        #function

        #[doc(hidden)]
        #[allow(non_camel_case_types, dead_code)]
        #vis struct #ident {}

        impl #ident {
            #[doc = #doc]
            #[allow(dead_code, clippy::needless_borrow)]
            #vis fn tool() -> #krate::ToolDef {
                #imports
                #def
            }
        }

        #checks
    }
}

/// `#[toolkit]` on an `impl` block.
pub(crate) fn toolkit(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut block: ItemImpl = match syn::parse2(item.clone()) {
        Ok(b) => b,
        Err(_) => {
            let e = syn::Error::new(
                Span::call_site(),
                "`#[toolkit]` goes on an `impl` block (`impl MyState { ... }`) whose `#[tool]` \
                 methods are the tools",
            );
            let error = e.to_compile_error();
            return quote!(#error #item);
        }
    };
    let mut errors = Errors::default();
    let krate = match ToolkitArgs::parse(attr) {
        Ok(args) => crate_path(args.krate),
        Err(e) => {
            errors.push(e);
            crate_path(None)
        }
    };
    if let Some((_, path, _)) = &block.trait_ {
        errors.push(syn::Error::new(
            path.span(),
            "`#[toolkit]` goes on an inherent `impl` block (`impl MyState { ... }`), not on a \
             trait's",
        ));
    }
    if !block.generics.params.is_empty() || block.generics.where_clause.is_some() {
        errors.push(syn::Error::new(
            block.generics.span(),
            "a toolkit can not be generic: register a concrete type",
        ));
    }

    let mut tools: Vec<ToolFn> = Vec::new();
    for item in &mut block.items {
        let ImplItem::Fn(method) = item else { continue };
        let Some(index) = method.attrs.iter().position(is_tool_attr) else {
            continue;
        };
        let attr = method.attrs.remove(index);
        let args = tool_attr_args(&attr).unwrap_or_else(|e| {
            errors.push(e);
            ToolArgs::default()
        });
        if let Some(path) = &args.krate {
            errors.push(syn::Error::new(
                path.span(),
                "give `crate = ...` to `#[toolkit(...)]`, for all its tools",
            ));
        }
        match signature::read(&method.attrs, &mut method.sig, args, Place::Toolkit) {
            Ok(tool) => {
                let name = tool.name.value();
                if let Some(first) = tools.iter().find(|t| t.name.value() == name) {
                    errors.push(syn::Error::new(
                        tool.name.span(),
                        format!(
                            "duplicate tool name `{name}`: the method `{}` of this toolkit is \
                             that tool already",
                            first.ident
                        ),
                    ));
                }
                tools.push(tool);
            }
            Err(e) => errors.push(e),
        }
    }
    if let Err(e) = errors.finish() {
        let error = e.to_compile_error();
        return quote!(#error #block);
    }

    let self_ty = &block.self_ty;
    let imports = imports(&krate);
    let defs = tools.iter().map(|tool| {
        let def = tool_def(tool, &krate, Callee::Method);
        match tool.receiver {
            Receiver::Ref => quote!({
                let __atp_state = ::std::sync::Arc::clone(&self);
                #def
            }),
            Receiver::None => def,
        }
    });
    let checks = tools.iter().map(|tool| checks(tool, &krate));
    quote! {
        #block

        impl #krate::Toolkit for #self_ty {
            #[allow(clippy::needless_borrow)]
            fn tools(self: ::std::sync::Arc<Self>) -> ::std::vec::Vec<#krate::ToolDef> {
                #imports
                ::std::vec![#(#defs),*]
            }
        }

        #(#checks)*
    }
}

/// `::atp_registry`, unless `crate = ...` says otherwise.
fn crate_path(given: Option<Path>) -> TokenStream {
    match given {
        Some(path) => quote!(#path),
        None => quote!(::atp_registry),
    }
}

/// Whether an attribute is `#[tool]` (any path ending in `tool`).
fn is_tool_attr(attr: &Attribute) -> bool {
    attr.path()
        .segments
        .last()
        .is_some_and(|s| s.ident == "tool")
}

/// The arguments of a `#[tool(...)]` inside `#[toolkit]`.
fn tool_attr_args(attr: &Attribute) -> syn::Result<ToolArgs> {
    match &attr.meta {
        syn::Meta::Path(_) => Ok(ToolArgs::default()),
        syn::Meta::List(list) => ToolArgs::parse(list.tokens.clone()),
        syn::Meta::NameValue(nv) => Err(syn::Error::new(
            nv.span(),
            "write `#[tool]` or `#[tool(name = \"...\", ...)]`",
        )),
    }
}

/// The traits the generated code picks methods with.
fn imports(krate: &TokenStream) -> TokenStream {
    quote! {
        #[allow(unused_imports)]
        use #krate::__private::{
            NoOutputSchema as _, OptionalParam as _, PlainOutput as _, PlainOutputSchema as _,
            RequiredParam as _, ResultOutput as _, ResultOutputSchema as _,
        };
    }
}

/// How the generated handler calls the function.
#[derive(Clone, Copy)]
enum Callee {
    /// `name(...)`.
    Free,
    /// `__atp_this.name(...)` with `&self`, `Self::name(...)` without.
    Method,
}

/// The expression that makes the tool's `ToolDef`.
fn tool_def(tool: &ToolFn, krate: &TokenStream, callee: Callee) -> TokenStream {
    let atp = quote!(#krate::__private);
    let name = &tool.name;
    let description = &tool.description;
    let auth = [
        ("auth_provider", &tool.args_given.auth_provider),
        ("auth_type", &tool.args_given.auth_type),
        ("auth_with", &tool.args_given.auth_with),
    ]
    .into_iter()
    .filter_map(|(method, value)| {
        let method = format_ident!("{method}");
        value.as_ref().map(|v| quote!(.#method(#v)))
    });

    let mut params = Vec::new();
    let mut slots = Vec::new();
    let mut arms = Vec::new();
    let mut reads = Vec::new();
    let mut call_args = Vec::new();
    let mut uses_params = false;
    let mut uses_token = false;
    for (i, arg) in tool.args.iter().enumerate() {
        let var = format_ident!("__atp_arg{i}");
        let ty = &arg.ty;
        match &arg.kind {
            ArgKind::Param { name, span: _, doc } => {
                uses_params = true;
                let schema = quote!(#atp::schema_fn::<#ty>());
                let read = quote_spanned!(ty.span()=> #atp::arg::<#ty>);
                params.push(quote! {
                    .param(#name, #doc, (&&#atp::probe::<#ty>()).atp_optional(), #schema)
                });
                slots.push(quote! {
                    let mut #var: ::core::option::Option<#ty> = ::core::option::Option::None;
                });
                arms.push(quote! {
                    #name => #var = ::core::option::Option::Some(#read(__atp_value)?),
                });
                reads.push(quote! {
                    let #var: #ty = match #var {
                        ::core::option::Option::Some(value) => value,
                        ::core::option::Option::None => #atp::absent::<#ty>(#name)?,
                    };
                });
            }
            ArgKind::Token { optional } => {
                uses_token = true;
                reads.push(if *optional {
                    quote!(let #var = __atp_token;)
                } else {
                    quote!(let #var = #atp::token(__atp_token)?;)
                });
            }
            ArgKind::Progress => {
                slots.insert(0, quote!(let #var = __atp_call.progress_handle();));
            }
        }
        call_args.push(var);
    }
    let params_pat = if uses_params {
        quote!(__atp_params)
    } else {
        quote!(_)
    };
    let token_pat = if uses_token {
        quote!(__atp_token)
    } else {
        quote!(_)
    };
    let read_params = uses_params.then(|| {
        quote! {
            for (__atp_key, __atp_value) in __atp_params {
                match __atp_key.as_str() {
                    #(#arms)*
                    _ => {}
                }
            }
        }
    });

    let ident = &tool.ident;
    let (this, target) = match (callee, tool.receiver) {
        (Callee::Free, _) => (None, quote!(#ident)),
        (Callee::Method, Receiver::Ref) => (
            Some(quote!(let __atp_this = ::std::sync::Arc::clone(&__atp_state);)),
            quote!(__atp_this.#ident),
        ),
        (Callee::Method, Receiver::None) => (None, quote!(Self::#ident)),
    };
    let output = quote!((&&#atp::probe_of(&__atp_out)).atp_output_kind().output(__atp_out));
    let (finish, run) = if tool.is_async {
        (
            quote!(asynchronous),
            quote!(async move {
                let __atp_out = #target(#(#call_args),*).await;
                #output
            }),
        )
    } else {
        (
            quote!(blocking),
            quote!(move || {
                let __atp_out = #target(#(#call_args),*);
                #output
            }),
        )
    };
    let output_schema = tool
        .output
        .as_ref()
        .map(|ty| quote!(.output((&&&#atp::probe::<#ty>()).atp_output_schema())));

    quote! {
        #atp::Def::new(
            #atp::Tool::new(#name).description(#description.trim()) #(#auth)*
        )
        #(#params)*
        #output_schema
        .#finish(move |__atp_call: #atp::Call| -> ::core::result::Result<_, ::std::string::String> {
            #(#slots)*
            let (#params_pat, #token_pat) = __atp_call.into_parts();
            #read_params
            #(#reads)*
            #this
            ::core::result::Result::Ok(#run)
        })
    }
}

/// The compile-time checks of the rules atp-registry owns, each failing
/// where the name that breaks it is written: the tool's name
/// (`is_valid_tool_name`) and its params' (`auth_token` is reserved).
fn checks(tool: &ToolFn, krate: &TokenStream) -> TokenStream {
    let name = &tool.name;
    let message = braces_escaped(&format!(
        "`{}` is not a valid tool name: use 1 to 64 characters from A-Z a-z 0-9 _ - \
         (atp_registry::is_valid_tool_name)",
        name.value()
    ));
    let mut checks = vec![quote_spanned! {name.span()=>
        const _: () = if !#krate::is_valid_tool_name(#name) {
            ::core::panic!(#message)
        };
    }];
    for arg in &tool.args {
        if let ArgKind::Param { name, span, .. } = &arg.kind {
            let literal = LitStr::new(name, *span);
            let message = braces_escaped(&format!(
                "`{name}` can not name a param: it is reserved for the call's auth token \
                 (take the token as `{name}: AuthToken`, or rename the argument)"
            ));
            checks.push(quote_spanned! {*span=>
                const _: () = if #krate::__private::is_reserved_param(#literal) {
                    ::core::panic!(#message)
                };
            });
        }
    }
    quote!(#(#checks)*)
}

/// `text` as a format string that prints it.
fn braces_escaped(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}
