"""Language-model RL losses and their exact bias on an enumerable toy (public: scoregrad.lm_rl)."""
