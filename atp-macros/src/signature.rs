//! What a tool function's signature says: its params, its token and
//! progress arguments, its result — and what the rules refuse in it.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote};
use syn::{
    Attribute, Expr, ExprLit, FnArg, GenericArgument, Ident, Lit, LitStr, Pat, PathArguments,
    ReturnType, Signature, Type, ext::IdentExt, spanned::Spanned,
};

use crate::args::ToolArgs;

/// One argument of a tool function.
pub(crate) struct Arg {
    pub ty: Type,
    pub kind: ArgKind,
}

/// What an argument is.
pub(crate) enum ArgKind {
    /// A param: its name (the argument's), where it is written, and its
    /// doc comment (an expression of type `&str`).
    Param {
        name: String,
        span: Span,
        doc: TokenStream,
    },
    /// The call's auth token, `AuthToken` or `Option<AuthToken>`.
    Token { optional: bool },
    /// The call's progress handle.
    Progress,
}

/// How the tool function is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receiver {
    /// A free function, or an associated one without `self`.
    None,
    /// `&self`.
    Ref,
}

/// A tool function, read.
pub(crate) struct ToolFn {
    pub ident: Ident,
    /// The tool's name, and the span to blame for it.
    pub name: LitStr,
    /// The description (an expression of type `&str`, trimmed later).
    pub description: TokenStream,
    pub is_async: bool,
    pub receiver: Receiver,
    pub args: Vec<Arg>,
    /// The return type, when it can be named (not `impl Trait`); `()`
    /// when there is none.
    pub output: Option<Type>,
    pub args_given: ToolArgs,
}

/// Whether methods are allowed: inside `#[toolkit]`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Free,
    Toolkit,
}

/// Reads a tool function's signature, taking the doc comments off its
/// arguments (rustc does not allow them there once the macro is done).
/// Every problem found is reported, not only the first.
pub(crate) fn read(
    attrs: &[Attribute],
    sig: &mut Signature,
    args_given: ToolArgs,
    place: Place,
) -> syn::Result<ToolFn> {
    let mut errors = Errors::default();
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            "a tool can not be generic: its params and their schemas are fixed when it is \
             registered",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.push(syn::Error::new(
            unsafety.span(),
            "a tool can not be an `unsafe fn`: callers can not uphold its contract",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new(
            variadic.span(),
            "a tool can not be variadic",
        ));
    }

    let mut receiver = Receiver::None;
    let mut args = Vec::new();
    for input in sig.inputs.iter_mut() {
        match input {
            FnArg::Receiver(r) => match place {
                Place::Free => errors.push(syn::Error::new_spanned(
                    &*r,
                    "a `self` receiver outside `#[toolkit]`: put `#[toolkit]` on the `impl` \
                     block, whose `#[tool]` methods share `&self`",
                )),
                Place::Toolkit => {
                    if r.reference.is_none() || r.mutability.is_some() || r.colon_token.is_some() {
                        errors.push(syn::Error::new_spanned(
                            &*r,
                            "a toolkit's tools take `&self`: its state is shared by calls \
                             that run at the same time",
                        ));
                    }
                    receiver = Receiver::Ref;
                }
            },
            FnArg::Typed(arg) => {
                let doc = take_docs(&mut arg.attrs);
                for attr in &arg.attrs {
                    if attr.path().is_ident("cfg") || attr.path().is_ident("cfg_attr") {
                        errors.push(syn::Error::new_spanned(
                            attr,
                            "`#[cfg]` on a tool's argument is not supported",
                        ));
                    }
                }
                let ident = match &*arg.pat {
                    Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => p.ident.clone(),
                    other => {
                        errors.push(syn::Error::new_spanned(
                            other,
                            "a tool's arguments are plain names (`name: Type`): each name is a \
                             param's name",
                        ));
                        continue;
                    }
                };
                let ty = (*arg.ty).clone();
                if let Some(problem) = unusable_type(&ty) {
                    errors.push(problem);
                    continue;
                }
                let kind = if is_path_to(&ty, "AuthToken") {
                    ArgKind::Token { optional: false }
                } else if option_of(&ty).is_some_and(|inner| is_path_to(inner, "AuthToken")) {
                    ArgKind::Token { optional: true }
                } else if is_path_to(&ty, "Progress") {
                    ArgKind::Progress
                } else {
                    ArgKind::Param {
                        name: ident.unraw().to_string(),
                        span: ident.span(),
                        doc: doc.unwrap_or_else(|| quote!("")),
                    }
                };
                args.push(Arg { ty, kind });
            }
        }
    }

    let tokens: Vec<&Arg> = args
        .iter()
        .filter(|a| matches!(a.kind, ArgKind::Token { .. }))
        .collect();
    if let Some(second) = tokens.get(1) {
        errors.push(syn::Error::new_spanned(
            &second.ty,
            "a tool has one auth token: only one argument can be an `AuthToken`",
        ));
    }
    let progresses: Vec<&Arg> = args
        .iter()
        .filter(|a| matches!(a.kind, ArgKind::Progress))
        .collect();
    if let Some(second) = progresses.get(1) {
        errors.push(syn::Error::new_spanned(
            &second.ty,
            "only one argument can be the call's `Progress`",
        ));
    }
    let requires_auth = args_given.auth_provider.is_some() || args_given.auth_type.is_some();
    for arg in &tokens {
        if matches!(arg.kind, ArgKind::Token { optional: false }) && !requires_auth {
            errors.push(syn::Error::new_spanned(
                &arg.ty,
                "an `AuthToken` argument needs `auth_provider` or `auth_type` in `#[tool(...)]` \
                 (then calls without a token are refused before the tool runs); take an \
                 `Option<AuthToken>` to run without one",
            ));
        }
    }

    let output = match &sig.output {
        ReturnType::Default => Some(syn::parse_quote!(())),
        ReturnType::Type(_, ty) if contains_impl_trait(ty) => None,
        ReturnType::Type(_, ty) => Some((**ty).clone()),
    };

    let name = match &args_given.name {
        Some(name) => name.clone(),
        None => LitStr::new(&sig.ident.unraw().to_string(), sig.ident.span()),
    };
    let description = match (&args_given.description, docs(attrs)) {
        (Some(d), _) => d.to_token_stream(),
        (None, Some(doc)) => doc,
        (None, None) => quote!(""),
    };

    errors.finish()?;
    Ok(ToolFn {
        ident: sig.ident.clone(),
        name,
        description,
        is_async: sig.asyncness.is_some(),
        receiver,
        args,
        output,
        args_given,
    })
}

/// Errors gathered, reported together.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The doc comment of `attrs`, as an expression of type `&str`: each
/// line without its first space, lines joined by `\n` (as rustdoc and
/// schemars read it; trimmed where it is used). `None` without one.
fn docs(attrs: &[Attribute]) -> Option<TokenStream> {
    let mut parts = Vec::new();
    for attr in attrs {
        if !attr.path().is_ident("doc") {
            continue;
        }
        let Ok(nv) = attr.meta.require_name_value() else {
            continue;
        };
        let part = match &nv.value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) => {
                let value = s.value();
                let line = value.strip_prefix(' ').unwrap_or(&value);
                LitStr::new(line, s.span()).to_token_stream()
            }
            other => other.to_token_stream(),
        };
        parts.push(part);
    }
    if parts.len() <= 1 {
        return parts.pop();
    }
    let mut joined = Vec::new();
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            joined.push(quote!("\n"));
        }
        joined.push(part);
    }
    Some(quote!(::core::concat!(#(#joined),*)))
}

/// Takes the doc comment off an argument, returning it.
fn take_docs(attrs: &mut Vec<Attribute>) -> Option<TokenStream> {
    let doc = docs(attrs);
    attrs.retain(|a| !a.path().is_ident("doc"));
    doc
}

/// Why a type can not be a tool argument, if it can not.
fn unusable_type(ty: &Type) -> Option<syn::Error> {
    if contains_impl_trait(ty) {
        return Some(syn::Error::new_spanned(
            ty,
            "a tool's argument types are concrete (no `impl Trait`): the param's schema comes \
             from the type",
        ));
    }
    if let Type::Reference(r) = ty {
        return Some(syn::Error::new_spanned(
            r,
            "a tool's arguments are owned values read from the call (a `String`, not a `&str`)",
        ));
    }
    None
}

/// Whether `ty` is a path whose last segment is `name`, without generics
/// (`AuthToken`, `atp_registry::AuthToken`).
fn is_path_to(ty: &Type, name: &str) -> bool {
    let Type::Path(p) = ty else { return false };
    p.qself.is_none()
        && p.path
            .segments
            .last()
            .is_some_and(|s| s.ident == name && s.arguments.is_none())
}

/// `T` of `Option<T>` (any path ending in `Option`).
fn option_of(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first() {
        Some(GenericArgument::Type(inner)) if args.args.len() == 1 => Some(inner),
        _ => None,
    }
}

/// Whether `ty` has an `impl Trait` anywhere.
fn contains_impl_trait(ty: &Type) -> bool {
    match ty {
        Type::ImplTrait(_) => true,
        Type::Path(p) => {
            p.qself.as_ref().is_some_and(|q| contains_impl_trait(&q.ty))
                || p.path.segments.iter().any(|s| match &s.arguments {
                    PathArguments::AngleBracketed(a) => a.args.iter().any(|g| match g {
                        GenericArgument::Type(t) => contains_impl_trait(t),
                        _ => false,
                    }),
                    PathArguments::Parenthesized(a) => {
                        a.inputs.iter().any(contains_impl_trait)
                            || matches!(&a.output, ReturnType::Type(_, t) if contains_impl_trait(t))
                    }
                    PathArguments::None => false,
                })
        }
        Type::Reference(r) => contains_impl_trait(&r.elem),
        Type::Slice(s) => contains_impl_trait(&s.elem),
        Type::Array(a) => contains_impl_trait(&a.elem),
        Type::Ptr(p) => contains_impl_trait(&p.elem),
        Type::Paren(p) => contains_impl_trait(&p.elem),
        Type::Group(g) => contains_impl_trait(&g.elem),
        Type::Tuple(t) => t.elems.iter().any(contains_impl_trait),
        _ => false,
    }
}
