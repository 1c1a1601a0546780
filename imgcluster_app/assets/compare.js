// The Label page's comparison column (a Streamlit custom component, v2): the compared label's
// most typical photos, and one button that moves the main grid's selection there.
//
// The selection lives in the main grid, in the browser (see grid.js): the grid publishes it
// per view (`globalThis.__imgclusterSelections` and an "imgcluster-selection" event), and the
// button sends exactly those ids with the grid's view, so Python's stale-state check applies
// as it does to the grid's own "Move".
//
// No framework, no build step, no network: plain DOM, shipped in the repository.

const LISTENERS = (globalThis.__imgclusterCompare ??= new Map());

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, String(value));
  }
  if (text !== null) node.textContent = text; // user text only ever as text, never as HTML
  return node;
}

function selectedIn(view) {
  const store = globalThis.__imgclusterSelections;
  return (store && store.get(view)) || [];
}

export default function (component) {
  const { data, parentElement, setTriggerValue, key } = component;
  parentElement.querySelectorAll(".icc").forEach((node) => node.remove());
  const root = el("div", { class: "icc", "data-compare": data.name });
  const move = el("button", { type: "button", class: "primary", "data-act": "move-here" });
  const head = el("div", { class: "head" });
  head.append(el("strong", { class: "title" }, data.title), move);
  const grid = el("div", { class: "grid", role: "list", "aria-label": `Most typical photos of ${data.name}` });
  for (const item of data.items) {
    const cell = el("div", { class: "cell", role: "listitem", "data-compare-relpath": item.relpath, title: item.relpath });
    if (item.src) cell.append(el("img", { src: item.src, alt: item.relpath, draggable: "false" }));
    else cell.append(el("span", { class: "missing" }, "no thumbnail"));
    grid.append(cell);
  }
  root.append(head, grid);
  if (data.more) root.append(el("div", { class: "more" }, data.more));
  parentElement.append(root);

  const paint = () => {
    const n = selectedIn(data.view).length;
    const what = n === 1 ? "1 image" : `${n.toLocaleString()} images`;
    move.textContent = n ? `Move ${what} to ${data.name}` : `Move the selection to ${data.name}`;
    move.disabled = n === 0;
    move.title = n ? `Move the ${n} images selected on the left into ${data.name}` : "Select images on the left first";
  };
  move.onclick = () => {
    const ids = selectedIn(data.view);
    if (!ids.length) return;
    setTriggerValue("action", { kind: "move", ids, view: data.view, target: data.target });
  };
  const old = LISTENERS.get(key);
  if (old) document.removeEventListener("imgcluster-selection", old);
  const listener = (event) => {
    if (event.detail && event.detail.view === data.view) paint();
  };
  LISTENERS.set(key, listener);
  document.addEventListener("imgcluster-selection", listener);
  paint();
  return () => {
    document.removeEventListener("imgcluster-selection", listener);
    if (LISTENERS.get(key) === listener) LISTENERS.delete(key);
  };
}
