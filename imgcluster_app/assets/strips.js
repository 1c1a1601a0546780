// The Clusters page's strips (a Streamlit custom component, v2): for every label shown, a
// header button (name, size, misfits, confirmed) that opens it on the Label page, an optional
// "Name it ..." button, and one JPEG of its most typical photos. One element for all strips:
// a k change then updates one node in place instead of ~70 Streamlit elements.
//
// No framework, no build step, no network: plain DOM, shipped in the repository. User text only
// ever goes in as text, never as HTML.

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, String(value));
  }
  if (text !== null) node.textContent = text;
  return node;
}

function row(strip, setTriggerValue) {
  const box = el("div", { class: `strip st-key-clusters_strip_${strip.slot}` });
  const open = el("button", {
    type: "button",
    class: `open st-key-clusters_open_${strip.slot}`,
    title: `Open ${strip.name} on the Label page`,
    "data-testid": "stStripOpen",
  });
  open.append(el("strong", {}, strip.name), document.createTextNode(` · ${strip.meta}`));
  open.append(el("span", { class: "arrow", "aria-hidden": "true" }, "→"));
  open.addEventListener("click", () => setTriggerValue("open", strip.name));
  box.append(open);
  if (strip.suggestion) {
    const accept = el(
      "button",
      {
        type: "button",
        class: `accept st-key-clusters_accept_${strip.id}`,
        title: "Suggested from the ImageNet classes its photos look like; one click renames",
      },
      `✨ Name it “${strip.suggestion}”`
    );
    accept.addEventListener("click", () =>
      setTriggerValue("accept", { id: strip.id, name: strip.suggestion })
    );
    box.append(accept);
  }
  if (strip.src) box.append(el("img", { src: strip.src, alt: `Typical photos of ${strip.name}` }));
  return box;
}

export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  // Rebuild only when what is shown changed (a rerun with the same data keeps the DOM).
  const signature = JSON.stringify(data.strips.map((s) => [s.slot, s.id, s.name, s.meta, s.suggestion, s.key]));
  let root = parentElement.querySelector(".icstrips");
  if (root && root.dataset.signature === signature) return;
  const fresh = el("div", { class: "icstrips" });
  fresh.dataset.signature = signature;
  for (const strip of data.strips) fresh.append(row(strip, setTriggerValue));
  if (root) root.replaceWith(fresh);
  else parentElement.append(fresh);
}
