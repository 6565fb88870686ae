/*
 * The project's one C++ file: toml++ behind the C API of toml_reader.h.
 *
 * Everything toml++ produces is first copied into plain C++ values while
 * walking the tree (so a failure halfway leaves nothing to clean up by
 * hand), then moved into malloc'ed C structs in one final step. No exception
 * crosses the C boundary: every public function catches them all.
 */
#include "toml_reader.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <toml++/toml.h>

namespace {

struct Value {
    moe_toml_type type = MOE_TOML_BOOL;
    int64_t i = 0;
    double f = 0.0;
    std::string s;
    std::vector<Value> items;
};

struct Entry {
    std::string table, key;
    Value value;
    int line = 0, column = 0;
};

struct Table {
    std::string name;
    int line = 0, column = 0;
};

// A document the config layer cannot use, found while walking the tree;
// carries the position so the message reads like a parse error.
struct ShapeError : std::runtime_error {
    int line, column;
    ShapeError(const std::string &what, const toml::source_position &at)
        : std::runtime_error(what), line(static_cast<int>(at.line)), column(static_cast<int>(at.column)) {}
};

void write_error(char *err, size_t errcap, const std::string &text) {
    if (err && errcap > 0) std::snprintf(err, errcap, "%s", text.c_str());
}

std::string position_prefix(const std::string &source, int line, int column) {
    return source + ":" + std::to_string(line) + ":" + std::to_string(column) + ": ";
}

// The key's own position when toml++ recorded one, else the value's.
toml::source_position position_of(const toml::key &k, const toml::node &n) {
    if (k.source().begin.line > 0) return k.source().begin;
    return n.source().begin;
}

Value read_scalar(const toml::node &n, const std::string &name, const toml::source_position &at) {
    Value v;
    switch (n.type()) {
    case toml::node_type::boolean:
        v.type = MOE_TOML_BOOL;
        v.i = n.as_boolean()->get() ? 1 : 0;
        return v;
    case toml::node_type::integer:
        v.type = MOE_TOML_INT;
        v.i = n.as_integer()->get();
        return v;
    case toml::node_type::floating_point:
        v.type = MOE_TOML_FLOAT;
        v.f = n.as_floating_point()->get();
        return v;
    case toml::node_type::string:
        v.type = MOE_TOML_STRING;
        v.s = n.as_string()->get();
        return v;
    case toml::node_type::date:
    case toml::node_type::time:
    case toml::node_type::date_time:
        throw ShapeError(name + ": dates and times are not supported; write the value as a string", at);
    default:
        throw ShapeError(name + ": unexpected value type", at);
    }
}

Value read_value(const toml::node &n, const std::string &name, const toml::source_position &at) {
    if (const toml::array *arr = n.as_array()) {
        Value v;
        v.type = MOE_TOML_ARRAY;
        for (const toml::node &item : *arr) {
            if (item.is_table())
                throw ShapeError(name + ": arrays of tables are not supported", at);
            if (item.is_array())
                throw ShapeError(name + ": nested arrays are not supported", at);
            v.items.push_back(read_scalar(item, name, at));
        }
        return v;
    }
    if (n.is_table()) throw ShapeError("nested table [" + name + "] is not supported", at);
    return read_scalar(n, name, at);
}

// Walk the root table: top-level tables become sections, their keys entries.
void walk(const toml::table &root, std::vector<Entry> &entries, std::vector<Table> &tables) {
    for (const auto &[key, node] : root) {
        const std::string section(key.str());
        const toml::source_position at = position_of(key, node);
        if (const toml::table *tbl = node.as_table()) {
            tables.push_back(Table{section, static_cast<int>(at.line), static_cast<int>(at.column)});
            for (const auto &[inner_key, inner_node] : *tbl) {
                const std::string name = section + "." + std::string(inner_key.str());
                const toml::source_position inner_at = position_of(inner_key, inner_node);
                Entry e;
                e.table = section;
                e.key = std::string(inner_key.str());
                e.value = read_value(inner_node, name, inner_at);
                e.line = static_cast<int>(inner_at.line);
                e.column = static_cast<int>(inner_at.column);
                entries.push_back(std::move(e));
            }
            continue;
        }
        if (const toml::array *arr = node.as_array(); arr && !arr->empty() && arr->front().is_table())
            throw ShapeError("array of tables [[" + section + "]] is not supported", at);
        Entry e;
        e.key = section;
        e.value = read_value(node, section, at);
        e.line = static_cast<int>(at.line);
        e.column = static_cast<int>(at.column);
        entries.push_back(std::move(e));
    }
    // toml++ keeps keys in a sorted map; the config layer reports the first
    // problem in the file, so restore the order they were written in.
    std::stable_sort(entries.begin(), entries.end(), [](const Entry &a, const Entry &b) {
        return a.line != b.line ? a.line < b.line : a.column < b.column;
    });
    std::stable_sort(tables.begin(), tables.end(), [](const Table &a, const Table &b) {
        return a.line != b.line ? a.line < b.line : a.column < b.column;
    });
}

char *copy_string(const std::string &s) {
    char *out = static_cast<char *>(std::malloc(s.size() + 1));
    if (!out) throw std::bad_alloc();
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
    return out;
}

void free_value(moe_toml_value *v) {
    std::free(v->s);
    for (int k = 0; k < v->n_items; ++k) std::free(v->items[k].s);
    std::free(v->items);
    *v = moe_toml_value{};
}

// Fill a zeroed C value; on bad_alloc what was filled stays reachable from
// `out`, so moe_toml_doc_free releases it.
void export_value(const Value &in, moe_toml_value *out) {
    out->type = in.type;
    out->i = in.i;
    out->f = in.f;
    if (in.type == MOE_TOML_STRING) out->s = copy_string(in.s);
    if (in.type == MOE_TOML_ARRAY && !in.items.empty()) {
        out->items = static_cast<moe_toml_value *>(std::calloc(in.items.size(), sizeof(moe_toml_value)));
        if (!out->items) throw std::bad_alloc();
        for (const Value &item : in.items) export_value(item, &out->items[out->n_items++]);
    }
}

void export_doc(const std::vector<Entry> &entries, const std::vector<Table> &tables, moe_toml_doc *doc) {
    if (!entries.empty()) {
        doc->entries = static_cast<moe_toml_entry *>(std::calloc(entries.size(), sizeof(moe_toml_entry)));
        if (!doc->entries) throw std::bad_alloc();
        for (const Entry &e : entries) {
            moe_toml_entry *out = &doc->entries[doc->n_entries++];
            out->line = e.line;
            out->column = e.column;
            out->table = copy_string(e.table);
            out->key = copy_string(e.key);
            export_value(e.value, &out->value);
        }
    }
    if (!tables.empty()) {
        doc->tables = static_cast<moe_toml_table *>(std::calloc(tables.size(), sizeof(moe_toml_table)));
        if (!doc->tables) throw std::bad_alloc();
        for (const Table &t : tables) {
            moe_toml_table *out = &doc->tables[doc->n_tables++];
            out->line = t.line;
            out->column = t.column;
            out->name = copy_string(t.name);
        }
    }
}

int parse_text(std::string_view text, const std::string &source, moe_toml_doc *doc, char *err, size_t errcap) {
    try {
        const toml::table root = toml::parse(text, source);
        std::vector<Entry> entries;
        std::vector<Table> tables;
        walk(root, entries, tables);
        export_doc(entries, tables, doc);
        return 0;
    } catch (const toml::parse_error &e) {
        const toml::source_position at = e.source().begin;
        write_error(err, errcap,
                    position_prefix(source, static_cast<int>(at.line), static_cast<int>(at.column)) +
                        std::string(e.description()));
    } catch (const ShapeError &e) {
        write_error(err, errcap, position_prefix(source, e.line, e.column) + e.what());
    } catch (const std::bad_alloc &) {
        write_error(err, errcap, source + ": out of memory while reading TOML");
    } catch (const std::exception &e) {
        write_error(err, errcap, source + ": " + e.what());
    } catch (...) {
        write_error(err, errcap, source + ": unknown error while reading TOML");
    }
    moe_toml_doc_free(doc);
    return -1;
}

} // namespace

extern "C" int moe_toml_parse_string(const char *text, const char *source_name, moe_toml_doc *doc, char *err,
                                     size_t errcap) {
    *doc = moe_toml_doc{};
    try {
        const std::string source = source_name ? source_name : "<string>";
        return parse_text(text ? std::string_view(text) : std::string_view(), source, doc, err, errcap);
    } catch (...) {
        // Only std::string construction can get here (out of memory).
        write_error(err, errcap, "out of memory while reading TOML");
        moe_toml_doc_free(doc);
        return -1;
    }
}

extern "C" int moe_toml_parse_file(const char *path, moe_toml_doc *doc, char *err, size_t errcap) {
    *doc = moe_toml_doc{};
    try {
        // Read the file ourselves so an unreadable file is reported with the
        // operating system's reason rather than toml++'s generic message.
        std::unique_ptr<std::FILE, int (*)(std::FILE *)> f(std::fopen(path, "rb"), std::fclose);
        if (!f) {
            write_error(err, errcap, std::string(path) + ": cannot open: " + std::strerror(errno));
            return -1;
        }
        std::string text;
        char buf[8192];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, f.get())) > 0) text.append(buf, n);
        if (std::ferror(f.get())) {
            write_error(err, errcap, std::string(path) + ": read error");
            return -1;
        }
        return parse_text(text, path, doc, err, errcap);
    } catch (...) {
        write_error(err, errcap, std::string("out of memory while reading ") + path);
        moe_toml_doc_free(doc);
        return -1;
    }
}

extern "C" void moe_toml_doc_free(moe_toml_doc *doc) {
    for (int k = 0; k < doc->n_entries; ++k) {
        std::free(doc->entries[k].table);
        std::free(doc->entries[k].key);
        free_value(&doc->entries[k].value);
    }
    std::free(doc->entries);
    for (int k = 0; k < doc->n_tables; ++k) std::free(doc->tables[k].name);
    std::free(doc->tables);
    *doc = moe_toml_doc{};
}
