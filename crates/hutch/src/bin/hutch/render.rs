//! How the CLI prints what it does not render through hutch_core::render: JSON, `describe` of
//! an API answer.

use serde_json::Value;

/// `describe` of a VM as the API returned it (typed: hutch_core::Vm), rendered as every front
/// door renders it (hutch_core::render).
pub(crate) fn describe(v: &Value) {
    match serde_json::from_value::<hutch_core::Vm>(v.clone()) {
        Ok(vm) => print!(
            "{}",
            hutch_core::render::describe(
                &vm,
                None,
                &format!(
                    "hutch exec {} -- sh",
                    hutch_core::render::display_name(&vm, None)
                )
            )
        ),
        Err(_) => out_json(v),
    }
}

pub(crate) fn out_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}
