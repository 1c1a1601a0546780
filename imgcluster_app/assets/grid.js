// The Label page's selection grid (a Streamlit custom component, v2).
//
// Selecting costs no server round trip: the selection lives here, in the browser, until an
// action (move, confirm, unsure, exclude, back to normal) sends it to Python as one trigger
// value. `data.view` names what is shown (label, page, order, search, revision): when it
// changes the selection is dropped, so a selection never carries over to another label or
// survives the action that used it.
//
// No framework, no build step, no network: plain DOM, shipped in the repository.

const STORE = (globalThis.__imgclusterGrid ??= new Map());
const NEW_LABEL = "__new__";

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  if (text !== null) node.textContent = text; // user text only ever as text, never as HTML
  return node;
}

function plural(n, one, many) {
  return `${n.toLocaleString()} ${n === 1 ? one : many}`;
}

function stateFor(key) {
  let state = STORE.get(key);
  if (!state) {
    state = { view: null, selected: new Set(), anchor: null, focus: 0, target: null, dom: null };
    STORE.set(key, state);
  }
  return state;
}

function build(parent, data) {
  const root = el("div", { class: "icg" });
  const bar = el("div", { class: "bar", role: "toolbar", "aria-label": "Selection" });
  const count = el("strong", { class: "count", "aria-live": "polite" });
  bar.append(count);
  const selectButtons = [
    ["page", "Select page", "Select every image on this page"],
    ["misfits", "Select misfits", "Select the images flagged as misfits on this page"],
    ["invert", "Invert", "Select the unselected images of this page instead"],
    ["clear", "Clear", "Select nothing (Esc)"],
  ];
  for (const [cmd, label, title] of selectButtons) {
    bar.append(el("button", { type: "button", "data-cmd": cmd, title }, label));
  }
  const actions = el("div", { class: "actions", role: "toolbar", "aria-label": "Actions" });
  const targetBox = el("label", { class: "target" });
  targetBox.append(el("span", {}, "Move to label"));
  const select = el("select", { "aria-label": "Move to label" });
  data.targets.forEach((t, i) => {
    select.append(el("option", { value: String(t.id), "data-key": i < 9 ? i + 1 : null }, t.name));
  });
  // A moves-only grid (gathering into one label) offers neither a new label nor the states.
  if (!data.moves_only) select.append(el("option", { value: NEW_LABEL }, "+ New label…"));
  targetBox.append(select);
  const newName = el("input", {
    type: "text",
    class: "newname",
    "aria-label": "New label name",
    placeholder: "New label name",
    maxlength: data.max_name || 200,
  });
  const move = el("button", { type: "button", class: "primary", "data-act": "move" });
  actions.append(targetBox, newName, move);
  const stateButtons = [
    ["confirm", "Confirm", "These images belong to this label (reviewed)"],
    ["unsure", "Mark unsure", "Set aside for a second look (stays in the label)"],
    ["excluded", "Exclude from export", "Keep out of the exported dataset"],
    ["normal", "Back to normal", "Undo unsure / excluded for these images"],
  ];
  for (const [act, label, title] of data.moves_only ? [] : stateButtons) {
    actions.append(el("button", { type: "button", "data-act": act, title }, label));
  }

  const grid = el("div", {
    class: "grid",
    role: "listbox",
    "aria-multiselectable": "true",
    "aria-label": "Images of this page",
    tabindex: "0",
  });
  data.items.forEach((item, index) => {
    const cell = el("div", {
      class: "cell",
      role: "option",
      "aria-selected": "false",
      "data-index": index,
      "data-id": item.id,
      "data-relpath": item.relpath,
      title: item.relpath,
    });
    const photo = el("div", { class: "photo" });
    if (item.src) photo.append(el("img", { src: item.src, alt: item.relpath, draggable: "false" }));
    else photo.append(el("span", { class: "missing" }, "no thumbnail"));
    if (item.misfit) {
      const text = item.nearer ? `misfit → ${item.nearer}` : "misfit";
      photo.append(el("span", { class: "badge misfit", title: `Looks more like ${item.nearer || "another label"}` }, `⚠ ${text}`));
    }
    const marks = [];
    if (item.confirmed) marks.push(["confirmed", "✓ confirmed"]);
    else if (item.by_hand) marks.push(["byhand", "moved by hand"]);
    if (item.state && item.state !== "normal") marks.push([item.state, item.state]);
    if (marks.length) {
      const strip = el("span", { class: "marks" });
      for (const [cls, text] of marks) strip.append(el("span", { class: `badge ${cls}` }, text));
      photo.append(strip);
    }
    photo.append(el("span", { class: "tick", "aria-hidden": "true" }, "✓"));
    const zoom = el("button", { type: "button", class: "zoom", "data-open": item.id, title: "Larger view (Enter)", "aria-label": `Larger view of ${item.relpath}` }, "⤢");
    photo.append(zoom);
    cell.append(photo, el("div", { class: "cap" }, item.relpath.split("/").pop()));
    grid.append(cell);
  });
  const keys = el("div", { class: "keys" });
  keys.append(
    el("span", {}, "Click a photo: select · Shift-click: a range · ←↑→↓: move the focus · Space: select · Enter: larger view · Esc: clear · "),
  );
  const legend = data.targets.slice(0, 9).map((t, i) => `${i + 1} ${t.name}`).join(" · ");
  keys.append(el("span", { class: "digits" }, legend ? `Digit: move the selection to ${legend}` : ""));
  root.append(bar, actions, grid, keys);
  parent.append(root);
  const cells = Array.from(grid.querySelectorAll(".cell"));
  return { root, count, move, select, newName, grid, cells, actions, bar };
}

function paint(dom, data, state) {
  const n = state.selected.size;
  // Other components of the page (the comparison's "move here") act on this selection.
  const chosen = Array.from(state.selected);
  (globalThis.__imgclusterSelections ??= new Map()).set(data.view, chosen);
  document.dispatchEvent(new CustomEvent("imgcluster-selection", { detail: { view: data.view, ids: chosen } }));
  dom.count.textContent = `${n.toLocaleString()} selected`;
  const total = data.items.length;
  dom.count.title = `${n} of ${total} on this page`;
  dom.cells.forEach((cell, i) => {
    const on = state.selected.has(Number(cell.dataset.id));
    cell.setAttribute("aria-selected", on ? "true" : "false");
    cell.classList.toggle("selected", on);
    cell.classList.toggle("focus", i === state.focus);
    cell.tabIndex = i === state.focus ? 0 : -1;
  });
  const isNew = dom.select.value === NEW_LABEL;
  dom.newName.hidden = !isNew;
  dom.move.textContent = n ? `Move ${plural(n, "image", "images")}` : "Move";
  for (const button of dom.actions.querySelectorAll("button")) button.disabled = n === 0;
  const misfits = data.items.filter((i) => i.misfit).length;
  const misfitButton = dom.bar.querySelector("[data-cmd=misfits]");
  misfitButton.textContent = `Select misfits (${misfits})`;
  misfitButton.disabled = misfits === 0;
}

export default function (component) {
  const { data, parentElement, setTriggerValue, key } = component;
  const state = stateFor(key);
  if (state.view !== data.view) {
    state.view = data.view;
    state.selected = new Set();
    state.anchor = null;
    state.focus = 0;
  }
  const ids = data.items.map((i) => i.id);
  const present = new Set(ids);
  for (const id of Array.from(state.selected)) if (!present.has(id)) state.selected.delete(id);
  state.focus = Math.min(state.focus, Math.max(0, ids.length - 1));

  // Rebuild only when what is shown changed (a rerun with the same data keeps the DOM).
  const signature = JSON.stringify([data.view, data.targets, ids, data.items.map((i) => [i.misfit, i.confirmed, i.state, i.by_hand])]);
  let dom = state.dom;
  if (!dom || state.signature !== signature || !parentElement.contains(dom.root)) {
    const previousTarget = dom ? dom.select.value : state.target;
    parentElement.querySelectorAll(".icg").forEach((node) => node.remove());
    dom = build(parentElement, data);
    state.dom = dom;
    state.signature = signature;
    if (previousTarget && Array.from(dom.select.options).some((o) => o.value === previousTarget)) {
      dom.select.value = previousTarget;
    }
  }

  const send = (kind, extra = {}) => {
    const chosen = ids.filter((id) => state.selected.has(id));
    setTriggerValue("action", { kind, ids: chosen, view: data.view, ...extra });
  };
  const sendMove = (targetValue) => {
    if (!state.selected.size) return;
    if (targetValue === NEW_LABEL) {
      const name = dom.newName.value.trim();
      if (!name) {
        dom.newName.focus();
        dom.newName.setAttribute("aria-invalid", "true");
        return;
      }
      send("move", { new_name: name });
    } else {
      send("move", { target: Number(targetValue) });
    }
  };
  const select = (i, { range = false, toggle = true } = {}) => {
    const id = ids[i];
    if (id === undefined) return;
    if (range && state.anchor !== null) {
      const [a, b] = state.anchor < i ? [state.anchor, i] : [i, state.anchor];
      for (let j = a; j <= b; j++) state.selected.add(ids[j]);
    } else if (toggle) {
      if (state.selected.has(id)) state.selected.delete(id);
      else state.selected.add(id);
      state.anchor = i;
    }
    state.focus = i;
    paint(dom, data, state);
  };
  const command = (cmd) => {
    if (cmd === "page") ids.forEach((id) => state.selected.add(id));
    if (cmd === "misfits") data.items.forEach((it) => it.misfit && state.selected.add(it.id));
    if (cmd === "invert") ids.forEach((id) => (state.selected.has(id) ? state.selected.delete(id) : state.selected.add(id)));
    if (cmd === "clear") state.selected.clear();
    state.anchor = null;
    paint(dom, data, state);
  };

  dom.root.onclick = (event) => {
    const open = event.target.closest("[data-open]");
    if (open) {
      event.stopPropagation();
      setTriggerValue("open", Number(open.dataset.open));
      return;
    }
    const cmd = event.target.closest("[data-cmd]");
    if (cmd) return command(cmd.dataset.cmd);
    const act = event.target.closest("[data-act]");
    if (act && !act.disabled) {
      if (act.dataset.act === "move") return sendMove(dom.select.value);
      return send(act.dataset.act);
    }
    const cell = event.target.closest(".cell");
    if (cell) {
      select(Number(cell.dataset.index), { range: event.shiftKey });
      dom.grid.focus({ preventScroll: true });
    }
  };
  dom.root.ondblclick = (event) => {
    const cell = event.target.closest(".cell");
    if (cell) setTriggerValue("open", Number(cell.dataset.id));
  };
  dom.select.onchange = () => {
    state.target = dom.select.value;
    paint(dom, data, state);
  };
  dom.newName.onkeydown = (event) => {
    event.stopPropagation();
    if (event.key === "Enter") sendMove(NEW_LABEL);
  };
  dom.grid.onkeydown = (event) => {
    const n = ids.length;
    if (!n) return;
    const first = dom.cells[0];
    const perRow = first
      ? Math.max(1, Math.round(dom.grid.clientWidth / first.getBoundingClientRect().width))
      : 1;
    let next = null;
    if (event.key === "ArrowRight") next = Math.min(n - 1, state.focus + 1);
    else if (event.key === "ArrowLeft") next = Math.max(0, state.focus - 1);
    else if (event.key === "ArrowDown") next = Math.min(n - 1, state.focus + perRow);
    else if (event.key === "ArrowUp") next = Math.max(0, state.focus - perRow);
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = n - 1;
    if (next !== null) {
      event.preventDefault();
      if (event.shiftKey) {
        if (state.anchor === null) state.anchor = state.focus;
        select(next, { range: true });
      } else {
        state.focus = next;
        paint(dom, data, state);
      }
      dom.cells[next]?.scrollIntoView({ block: "nearest" });
      return;
    }
    if (event.key === " " || event.key === "Spacebar") {
      event.preventDefault();
      select(state.focus);
    } else if (event.key === "Enter") {
      event.preventDefault();
      setTriggerValue("open", ids[state.focus]);
    } else if (event.key === "Escape") {
      event.preventDefault();
      command("clear");
    } else if (/^[1-9]$/.test(event.key) && !event.ctrlKey && !event.metaKey && !event.altKey) {
      const target = data.targets[Number(event.key) - 1];
      if (target && state.selected.size) {
        event.preventDefault();
        send("move", { target: target.id });
      }
    } else if (event.key === "a" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      command("page");
    }
  };
  paint(dom, data, state);
}
