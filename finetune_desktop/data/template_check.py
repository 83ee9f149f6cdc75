"""Static check of a Jinja chat template: does it copy every message's content verbatim into the
output, without ever looking at it?

If so, the rendering of any conversation is the template's fixed text for that pattern of roles
(and names) with the contents in between, so the encoder can build the text from pieces learned
once per pattern instead of running the template for every example. Anything the check does not
understand counts as "looks at the content" and the template is rendered per example as usual.

Allowed uses of a message (a variable bound to `messages`, an element or a slice of it, or
`[constant messages] + messages`): iterate it; index it with a constant or a slice;
`|length`/`|count`; tests such as `is defined`; its truth in a condition; read `role` or
`name` in any way (they are part of the pattern);
  read `content` only as part of a `{{ ... }}` output, joined with `+` or `~`.
Everything else (filters such as |trim, conditions, assignments, macro calls, |tojson,
.items(), dynamic keys) on a message or its content disqualifies the template."""
from __future__ import annotations

from functools import lru_cache

SAFE_KEYS = {"role", "name"}
SAFE_FILTERS = {"length", "count"}
SAFE_TESTS = {"defined", "undefined", "none", "mapping", "sequence", "iterable", "string"}


@lru_cache(maxsize=32)
def copies_content_verbatim(source: str) -> bool:
    try:
        from jinja2 import nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        tree = env.parse(source)
    except Exception:  # noqa: BLE001 - not parseable: render the usual way
        return False
    try:
        return _check(tree, nodes)
    except Exception:  # noqa: BLE001 - anything unexpected: be safe
        return False


def _parents(tree, nodes):
    parent = {}
    stack = [tree]
    while stack:
        n = stack.pop()
        for c in n.iter_child_nodes():
            parent[id(c)] = n
            stack.append(c)
    return parent


def _check(tree, nodes) -> bool:
    if any(True for _ in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends))):
        return False
    parent = _parents(tree, nodes)
    msgish = {"messages"}

    def constant_messages(expr) -> bool:
        """[{'role': 'system', 'content': '...'}] written in the template: fixed text."""
        return isinstance(expr, nodes.List) and all(
            isinstance(d, nodes.Dict) and all(isinstance(p.key, nodes.Const) and isinstance(p.value, nodes.Const)
                                              for p in d.items) for d in expr.items)

    def derives(expr) -> bool:
        """expr evaluates to a message or a list of messages (from the conversation, or constant)."""
        if isinstance(expr, nodes.Name):
            return expr.name in msgish
        if isinstance(expr, nodes.Getitem):
            return derives(expr.node) and (isinstance(expr.arg, nodes.Slice) or
                                           (isinstance(expr.arg, nodes.Const) and isinstance(expr.arg.value, int)))
        if isinstance(expr, nodes.CondExpr):   # a if test else b
            return derives(expr.expr1) and expr.expr2 is not None and derives(expr.expr2)
        if isinstance(expr, nodes.Add):        # [constant message] + messages
            return all(derives(x) or constant_messages(x) for x in (expr.left, expr.right))
        return False

    def in_test(node) -> bool:
        """node is (part of) the condition of an if / conditional expression: only its truth counts."""
        x = node
        while isinstance(parent.get(id(x)), (nodes.And, nodes.Or, nodes.Not)):
            x = parent[id(x)]
        p = parent.get(id(x))
        return isinstance(p, (nodes.If, nodes.CondExpr)) and p.test is x

    # names bound to messages: loop targets and aliases, to a fixed point
    changed = True
    while changed:
        changed = False
        for n in tree.find_all((nodes.For, nodes.Assign)):
            src = n.iter if isinstance(n, nodes.For) else n.node
            if derives(src):
                if not isinstance(n.target, nodes.Name):
                    return False  # unpacking or namespace attributes: not tracked
                if n.target.name not in msgish:
                    msgish.add(n.target.name)
                    changed = True
    # a name bound to messages must not be rebound to anything else (we would lose track)
    for n in tree.find_all((nodes.For, nodes.Assign, nodes.Macro, nodes.CallBlock, nodes.AssignBlock)):
        if isinstance(n, (nodes.For, nodes.Assign)):
            src = n.iter if isinstance(n, nodes.For) else n.node
            targets = [n.target] if isinstance(n.target, nodes.Name) else list(n.target.find_all(nodes.Name))
            if not derives(src) and any(t.name in msgish for t in targets):
                return False
        elif isinstance(n, nodes.AssignBlock):
            names = [n.target] if isinstance(n.target, nodes.Name) else list(n.target.find_all(nodes.Name))
            if any(t.name in msgish for t in names):
                return False
        else:  # macros may take parameters named like our variables: too clever for this check
            if any(a.name in msgish for a in n.args):
                return False

    def content_ok(node) -> bool:
        """`node` yields a content string: it may only flow into an output through + or ~."""
        x = node
        while True:
            p = parent.get(id(x))
            if isinstance(p, (nodes.Add, nodes.Concat)):
                x = p
                continue
            return isinstance(p, nodes.Output)

    def use_ok(node) -> bool:
        """`node` evaluates to a message or a list of messages; is the way it is used safe?"""
        p = parent.get(id(node))
        if isinstance(p, nodes.Add) and derives(p):                          # [constant] + messages
            return use_ok(p)
        if isinstance(p, nodes.CondExpr) and p.test is not node and derives(p):  # messages if .. else ..
            return use_ok(p)
        if in_test(node):
            return True
        if isinstance(p, nodes.For):
            return p.iter is node and isinstance(p.target, nodes.Name)
        if isinstance(p, nodes.Assign):
            return p.node is node and isinstance(p.target, nodes.Name)  # an alias, tracked above
        if isinstance(p, nodes.Getitem) and p.node is node:
            a = p.arg
            if isinstance(a, nodes.Slice) or (isinstance(a, nodes.Const) and isinstance(a.value, int)):
                return use_ok(p)
            if isinstance(a, nodes.Const) and a.value == "content":
                return content_ok(p)
            return isinstance(a, nodes.Const) and a.value in SAFE_KEYS
        if isinstance(p, nodes.Getattr) and p.node is node:
            if p.attr == "content":
                return content_ok(p)
            return p.attr in SAFE_KEYS
        if isinstance(p, nodes.Filter) and p.node is node:
            return p.name in SAFE_FILTERS
        if isinstance(p, nodes.Test) and p.node is node:
            return p.name in SAFE_TESTS
        return False

    for name in tree.find_all(nodes.Name):
        if name.name in msgish and name.ctx == "load" and not use_ok(name):
            return False
    return True
