// A global circuit's page (circuits/page/recurrence.py): on top of page.js, a clicked node's frequency and
// the prompts that keep it, and the list of all prompts (a click highlights the nodes a prompt keeps).
// Every string is written with textContent, never as HTML.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("circuits-recurrence").textContent);
  const page = window.circuitsPage;
  const el = page.el;  // page.js's element builder: text through textContent only
  const n = data.prompts.length;
  const kept = data.prompts.map(() => []);  // prompt index -> node ids it keeps
  for (const [id, node] of Object.entries(data.nodes)) node.prompts.forEach((p) => kept[p].push(id));

  function promptItem(p) {
    return el("li", { "data-prompt": String(p) },
      el("a", { text: data.prompts[p], title: `highlight the ${kept[p].length} nodes this prompt keeps`,
        onclick: () => showPrompt(p) }),
      el("span", { class: "num", text: ` \u2192 ${data.answers[p]}` }));
  }

  function showPrompt(p) {
    page.focusNodes(kept[p]);
    document.querySelectorAll("#recurrence-prompts li").forEach((li) =>
      li.classList.toggle("active", li.dataset.prompt === String(p)));
  }

  function showRecurrence(id) {
    const node = data.nodes[id];
    const box = document.getElementById("details");
    if (!node || box.dataset.node !== id) return;
    const k = node.prompts.length;
    const section = el("section", { class: "recurrence" },
      el("h3", { text: "recurrence" }),
      el("div", { class: "frequency", text: `kept by ${k} of ${n} prompts (frequency ${(100 * k / n).toFixed(0)}%)` }),
      el("div", { class: "num", text: `mean influence on the targets where kept: ${Number(node.mean_influence).toPrecision(3)}` }),
      el("h3", { text: `the ${k} prompts that keep it` }),
      el("ol", { class: "prompts" }, ...node.prompts.map(promptItem)));
    box.insertBefore(section, box.querySelector("h3"));  // right after the node's table and pin buttons
  }

  document.addEventListener("circuits:details", (e) => showRecurrence(e.detail.id));
  const hint = document.querySelector("#details .hint");
  if (hint) hint.textContent = "Click a node for how often it recurs, the prompts that keep it and its strongest links.";
  const list = el("ol", { id: "recurrence-prompts", class: "prompts" }, ...data.prompts.map((_, p) => promptItem(p)));
  const all = el("section", { id: "recurrence-all" }, el("h2", { text: `Prompts (${n})` }),
    el("p", { class: "hint", text: "Click a prompt to highlight the nodes its pruned graph keeps; Esc clears." }), list);
  document.getElementById("panel").insertBefore(all, document.getElementById("supernodes"));
  Object.assign(page, { showPrompt, keptBy: (p) => [...kept[p]] });
})();
