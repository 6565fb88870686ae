# The CUDA paths of the six router plugins against their CPU paths
# (test_gpu_routers.c). Included by tests/gpu/CMakeLists.txt; needs a GPU to
# run and exits 77 (skipped) without one.
if(MOE_WITH_CUDA)
  moe_add_test(test_gpu_routers SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_gpu_routers.c LIBS moe::sdk CUDA::cudart)
  add_dependencies(test_gpu_routers moe_plugin_top1 moe_plugin_topk_hard moe_plugin_softk moe_plugin_hash
                   moe_plugin_expert_choice moe_plugin_noisy_topk)
  set_tests_properties(test_gpu_routers PROPERTIES LABELS gpu SKIP_RETURN_CODE 77)
endif()
