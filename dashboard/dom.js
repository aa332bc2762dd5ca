// Building DOM nodes from data. Text always goes in as text nodes, never as
// HTML, so nothing a workspace name or an error message contains can run.

/** `h("a", {href: "#/"}, "text", child)`: an element with attributes and
 * children. `on*` attributes take functions; `null`/`false` attributes and
 * children are skipped. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(element.dataset, value);
    } else if (value === true) {
      element.setAttribute(name, "");
    } else {
      element.setAttribute(name, String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : String(child));
  }
}

/** An SVG element (charts). */
export function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined)
      element.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) element.append(child);
  }
  return element;
}

let counter = 0;

/** An id unique in this page, for tying labels and descriptions to fields. */
export function uniqueId(prefix) {
  counter += 1;
  return `${prefix}-${counter}`;
}

/** Replaces the children of `element`, skipping `null`, `undefined` and
 * `false` the way `h` does (the DOM's own `replaceChildren` would print them). */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}
