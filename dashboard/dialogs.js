// Modal dialogs: confirmations, forms and a key shown once. They use the
// native <dialog>, which traps focus, closes on Escape and returns focus to
// where it was.

import { h, uniqueId } from "/dashboard/dom.js";

function openDialog(dialog) {
  document.body.append(dialog);
  dialog.addEventListener("close", () => dialog.remove());
  dialog.showModal();
  return dialog;
}

/** Asks before doing something; resolves to whether the user confirmed. */
export function confirmDialog({ title, text, confirmLabel, danger = false }) {
  return new Promise((resolve) => {
    const titleId = uniqueId("dialog");
    const dialog = h(
      "dialog",
      { "aria-labelledby": titleId },
      h(
        "form",
        { method: "dialog" },
        h("h2", { id: titleId }, title),
        h("p", {}, text),
        h(
          "div",
          { class: "actions" },
          h(
            "button",
            {
              type: "submit",
              value: "confirm",
              class: danger ? "button danger" : "button",
            },
            confirmLabel,
          ),
          h(
            "button",
            {
              type: "submit",
              value: "cancel",
              class: "button subtle",
              autofocus: true,
            },
            "Cancel",
          ),
        ),
      ),
    );
    dialog.addEventListener("close", () =>
      resolve(dialog.returnValue === "confirm"),
    );
    openDialog(dialog);
  });
}

/**
 * A form in a dialog. `fields` are `{name, label, type, value, hint,
 * required, pattern, min, max, step, placeholder, options}`; a checkbox's
 * `value` is whether it starts checked, and it submits `true` or `false`; a
 * field with `options` (`[{value, label}]`) is a select of them.
 * `onSubmit(values)` may throw: its message is shown and the dialog stays
 * open with the input kept.
 */
export function formDialog({ title, fields, submitLabel, onSubmit }) {
  const titleId = uniqueId("dialog");
  const error = h("p", { class: "form-error", role: "alert", hidden: true });
  const inputs = fields.map((field) => {
    const id = uniqueId(`field-${field.name}`);
    const hintId = field.hint ? `${id}-hint` : null;
    const checkbox = field.type === "checkbox";
    const input = field.options
      ? h(
          "select",
          {
            id,
            name: field.name,
            required: field.required ?? false,
            "aria-describedby": hintId,
          },
          field.options.map((option) =>
            h(
              "option",
              { value: option.value, selected: option.value === field.value },
              option.label,
            ),
          ),
        )
      : h("input", {
          id,
          name: field.name,
          type: field.type ?? "text",
          value: checkbox ? null : (field.value ?? ""),
          checked: checkbox && Boolean(field.value),
          required: field.required ?? false,
          pattern: field.pattern ?? null,
          min: field.min ?? null,
          max: field.max ?? null,
          step: field.step ?? null,
          placeholder: field.placeholder ?? null,
          autocomplete: "off",
          "aria-describedby": hintId,
        });
    return {
      field,
      input,
      element: checkbox
        ? h(
            "div",
            { class: "field checkbox" },
            input,
            h("label", { for: id }, field.label),
            field.hint
              ? h("p", { class: "hint", id: hintId }, field.hint)
              : null,
          )
        : h(
            "div",
            { class: "field" },
            h("label", { for: id }, field.label),
            input,
            field.hint
              ? h("p", { class: "hint", id: hintId }, field.hint)
              : null,
          ),
    };
  });
  const submit = h("button", { type: "submit", class: "button" }, submitLabel);
  const form = h(
    "form",
    {},
    h("h2", { id: titleId }, title),
    h(
      "div",
      { class: "fields-grid" },
      inputs.map((entry) => entry.element),
    ),
    error,
    h(
      "div",
      { class: "actions" },
      submit,
      h(
        "button",
        {
          type: "button",
          class: "button subtle",
          onclick: () => dialog.close(),
        },
        "Cancel",
      ),
    ),
  );
  const dialog = h("dialog", { "aria-labelledby": titleId }, form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const values = Object.fromEntries(
      inputs.map(({ field, input }) => [
        field.name,
        input.type === "checkbox" ? input.checked : input.value.trim(),
      ]),
    );
    submit.disabled = true;
    error.hidden = true;
    try {
      await onSubmit(values);
      dialog.close();
    } catch (problem) {
      error.textContent = problem.message;
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });
  return openDialog(dialog);
}

/** Shows a new key once, with a copy button. */
export function secretDialog({ title, text, secret }) {
  const titleId = uniqueId("dialog");
  const copied = h("p", { class: "hint", role: "status" });
  const code = h("code", { class: "secret-value" }, secret);
  const copy = h(
    "button",
    {
      type: "button",
      class: "button",
      onclick: async () => {
        try {
          await navigator.clipboard.writeText(secret);
          copied.textContent = "Copied to the clipboard.";
        } catch {
          // Without clipboard access (plain http, or denied), select the
          // text so that the user can copy it by hand.
          window.getSelection().selectAllChildren(code);
          copied.textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
        }
      },
    },
    "Copy",
  );
  const dialog = h(
    "dialog",
    { "aria-labelledby": titleId },
    h("h2", { id: titleId }, title),
    h("p", {}, text),
    h("div", { class: "secret" }, code, copy),
    copied,
    h(
      "div",
      { class: "actions" },
      h(
        "button",
        {
          type: "button",
          class: "button subtle",
          onclick: () => dialog.close(),
        },
        "Done",
      ),
    ),
  );
  return openDialog(dialog);
}
