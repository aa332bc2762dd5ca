// Toasts for status transitions. Warnings and good news dismiss
// themselves; a blocked workspace's toast stays until dismissed, since
// someone has to act on it.

import { h } from "/dashboard/dom.js";
import { reasonText, statusLabel } from "/dashboard/format.js";

const AUTO_DISMISS_MS = 8000;
const MAX_TOASTS = 5;

export class Toasts {
  constructor(region) {
    this.region = region;
    // One toast per workspace: a newer transition replaces the older toast.
    this.byWorkspace = new Map();
  }

  /** Shows the transition of `doc` (a status document) from `previous`. */
  transition(previous, doc) {
    const sticky = doc.status === "quota_exceeded";
    const cause = doc.reasons.length > 0 ? reasonText(doc.reasons[0]) : null;
    const title =
      doc.status === "normal"
        ? `${doc.name}: back to normal`
        : `${doc.name}: ${statusLabel(doc.status).toLowerCase()}`;
    const text =
      doc.status === "normal"
        ? `Was ${statusLabel(previous).toLowerCase()}; requests flow again.`
        : `${cause ? `Cause: ${cause}.` : ""} ${doc.blocked ? "Requests are refused." : ""}`.trim();
    this.show({
      workspace: doc.workspace,
      status: doc.status,
      title,
      text,
      sticky,
    });
  }

  show({ workspace, status, title, text, sticky }) {
    this.byWorkspace.get(workspace)?.dismiss();
    const toast = h(
      "div",
      {
        class: "toast",
        role: sticky ? "alert" : "status",
        dataset: { status, workspace },
      },
      h(
        "div",
        {},
        h("p", { class: "title" }, title),
        text ? h("p", {}, text) : null,
      ),
      h(
        "button",
        {
          type: "button",
          class: "button subtle",
          "aria-label": `Dismiss: ${title}`,
          onclick: () => entry.dismiss(),
        },
        "Dismiss",
      ),
    );
    const entry = {
      element: toast,
      timer: sticky ? null : setTimeout(() => entry.dismiss(), AUTO_DISMISS_MS),
      dismiss: () => {
        clearTimeout(entry.timer);
        toast.remove();
        if (this.byWorkspace.get(workspace) === entry)
          this.byWorkspace.delete(workspace);
      },
    };
    this.byWorkspace.set(workspace, entry);
    this.region.append(toast);
    // The map keeps insertion order, so its first entry is the oldest toast.
    while (this.byWorkspace.size > MAX_TOASTS)
      this.byWorkspace.values().next().value.dismiss();
  }

  clear() {
    for (const entry of [...this.byWorkspace.values()]) entry.dismiss();
  }
}
